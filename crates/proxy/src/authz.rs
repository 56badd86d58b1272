//! Authorization: the Envoy RBAC engine the inbound path enforces.
//!
//! Purpose: decide whether a request (HTTP) or connection (TCP) may reach
//! the local application, from the RBAC filters of the listener's chain
//! (`envoy.filters.http.rbac` / `envoy.filters.network.rbac`, converted by
//! `config::xds`). `meshwork why` runs this same engine offline.
//!
//! Contract, as Envoy evaluates a chain of RBAC filters:
//! - filters run in order; in each, `shadow_rules` are evaluated first and
//!   only recorded (an AUDIT match: "would deny"), then `rules`: an ALLOW
//!   filter denies unless one of its policies matches, a DENY filter denies
//!   when one matches; the first denial ends the evaluation;
//! - policies are tried in lexicographic order of their names; a policy
//!   matches when one permission AND one principal match;
//! - the source identity is the SPIFFE id of the TLS peer
//!   ([`Input::peer_identity`]); without one (plaintext), `authenticated`
//!   principals never match (so `not` of them does), as in Envoy;
//! - on a TCP connection ([`Input::http`] `None`) header and path
//!   permissions never match.
//!
//! Non-goals: CEL conditions, IP, metadata and SNI matchers, per-route RBAC,
//! `LOG` actions: `config::xds` refuses them.

use http::{HeaderMap, HeaderName, Method};
use serde::Serialize;

use crate::config::model::StringMatch;
use crate::router;

/// The RBAC filters of one filter chain, in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Authz {
    pub filters: Vec<RbacFilter>,
}

/// One RBAC filter.
#[derive(Debug, Clone, Serialize)]
pub struct RbacFilter {
    /// `rules`: enforced.
    pub rules: Option<Rules>,
    /// `shadow_rules` (action DENY): evaluated, recorded, never enforced
    /// (audit).
    pub shadow: Option<Rules>,
}

/// An `envoy.config.rbac.v3.RBAC`.
#[derive(Debug, Clone, Serialize)]
pub struct Rules {
    pub action: Action,
    /// Sorted by name (Envoy evaluates in that order).
    pub policies: Vec<(String, Policy)>,
}

/// `RBAC.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// `Policy`: one permission and one principal must match.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// `Permission`: what is asked.
#[derive(Debug, Clone, Serialize)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    /// A request header or pseudo-header.
    Header(HeaderRule),
    /// The request path without query (`url_path`).
    UrlPath(Matcher),
}

/// `Principal`: who asks.
#[derive(Debug, Clone, Serialize)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// `authenticated.principal_name` against the peer's SPIFFE id; `None`:
    /// any authenticated peer.
    Authenticated(Option<Matcher>),
}

/// A `HeaderMatcher` in a permission.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderRule {
    pub header: HeaderTarget,
    pub matcher: Matcher,
    pub invert: bool,
}

/// Which header a [`HeaderRule`] reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HeaderTarget {
    Method,
    Authority,
    /// `:path`, query included.
    Path,
    Named(#[serde(serialize_with = "ser_name")] HeaderName),
}

/// A `StringMatcher` (or presence), optionally case-insensitive (then the
/// pattern is stored lower-cased).
#[derive(Debug, Clone, Serialize)]
pub struct Matcher {
    pub pattern: StringMatch,
    pub ignore_case: bool,
}

/// What a decision is made on.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// SPIFFE id of the verified TLS peer; `None` for plaintext.
    pub peer_identity: Option<&'a str>,
    /// The request, for HTTP; `None` for a TCP connection.
    pub http: Option<HttpInput<'a>>,
}

/// The HTTP attributes permissions look at.
#[derive(Debug, Clone, Copy)]
pub struct HttpInput<'a> {
    pub method: &'a Method,
    /// Path without query.
    pub path: &'a str,
    /// Path with query (`:path`).
    pub path_and_query: &'a str,
    /// `:authority` (or `Host`).
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding policy: the ALLOW policy that allowed, or the DENY
    /// policy that denied. `None` when allowed with no ALLOW filter, or
    /// denied because no ALLOW policy matched.
    pub policy: Option<String>,
    /// Denied by an ALLOW filter that has no policies at all (default deny).
    pub default_deny: bool,
    /// Shadow (audit) policies that would have denied, in order.
    pub audit: Vec<String>,
}

impl Authz {
    /// Evaluates every filter in order (see the module docs).
    pub fn evaluate(&self, input: &Input<'_>) -> Decision {
        let mut d = Decision {
            allowed: true,
            ..Default::default()
        };
        for f in &self.filters {
            // Shadow rules are always DENY (config::xds refuses others).
            if let Some(name) = f.shadow.as_ref().and_then(|s| s.first_match(input)) {
                d.audit.push(name.to_owned());
            }
            let Some(rules) = &f.rules else { continue };
            match (rules.action, rules.first_match(input)) {
                (Action::Allow, Some(name)) => d.policy = Some(name.to_owned()),
                (Action::Allow, None) => {
                    d.allowed = false;
                    d.policy = None;
                    d.default_deny = rules.policies.is_empty();
                    return d;
                }
                (Action::Deny, Some(name)) => {
                    d.allowed = false;
                    d.policy = Some(name.to_owned());
                    return d;
                }
                (Action::Deny, None) => {}
            }
        }
        d
    }
}

impl Rules {
    /// Name of the first policy (by name) that matches.
    pub fn first_match(&self, input: &Input<'_>) -> Option<&str> {
        self.policies
            .iter()
            .find(|(_, p)| p.matches(input))
            .map(|(n, _)| n.as_str())
    }
}

impl Policy {
    pub fn matches(&self, input: &Input<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(input))
            && self.principals.iter().any(|p| p.matches(input))
    }
}

impl Permission {
    pub fn matches(&self, input: &Input<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(v) => v.iter().all(|p| p.matches(input)),
            Permission::Or(v) => v.iter().any(|p| p.matches(input)),
            Permission::Not(p) => !p.matches(input),
            Permission::Header(h) => input.http.is_some_and(|r| h.matches(&r)),
            Permission::UrlPath(m) => input.http.is_some_and(|r| m.matches(r.path.as_bytes())),
        }
    }
}

impl Principal {
    pub fn matches(&self, input: &Input<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(v) => v.iter().all(|p| p.matches(input)),
            Principal::Or(v) => v.iter().any(|p| p.matches(input)),
            Principal::Not(p) => !p.matches(input),
            Principal::Authenticated(m) => match (input.peer_identity, m) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(id), Some(m)) => m.matches(id.as_bytes()),
            },
        }
    }
}

impl HeaderRule {
    fn matches(&self, r: &HttpInput<'_>) -> bool {
        let value: Option<std::borrow::Cow<'_, [u8]>> = match &self.header {
            HeaderTarget::Method => Some(r.method.as_str().as_bytes().into()),
            HeaderTarget::Authority => Some(r.authority.as_bytes().into()),
            HeaderTarget::Path => Some(r.path_and_query.as_bytes().into()),
            HeaderTarget::Named(name) => router::joined_values(r.headers, name),
        };
        let hit = match value {
            None => false,
            Some(v) => self.matcher.matches(&v),
        };
        hit != self.invert
    }
}

impl Matcher {
    pub fn matches(&self, value: &[u8]) -> bool {
        if self.ignore_case {
            router::string_matches(&self.pattern, &value.to_ascii_lowercase())
        } else {
            router::string_matches(&self.pattern, value)
        }
    }
}

fn ser_name<S: serde::Serializer>(n: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(n.as_str())
}

#[cfg(test)]
mod tests;
