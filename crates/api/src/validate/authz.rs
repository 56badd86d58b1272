//! Checks of `Mesh` and `AuthorizationPolicy` resources.
//!
//! Contract: everything the translator turns into Envoy RBAC is proven
//! well-formed here (SPIFFE ids and wildcard patterns, methods, paths,
//! header names and values, gRPC names, ports of the target Service), and
//! HTTP-only fields on a policy that can only see TCP connections are
//! refused with the field named, since they could never match.

use crate::error::{Errors, FieldPath};
use crate::mesh::{list_ports, Mesh};
use crate::resources::{
    AuthorizationPolicy, AuthzOperation, AuthzSource, Kind, MeshConfig, Service, MESH_CONFIG_NAME,
};
use crate::source::Sourced;

use super::{checks, label_of, Ck};

/// HTTP methods accepted in `to[].methods` without question.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

pub(crate) fn check_mesh_config(c: &Sourced<MeshConfig>, errors: &mut Errors) {
    let mc = &c.value;
    let mut ck = Ck::new(c, label_of(Kind::Mesh, &mc.metadata), errors);
    if mc.metadata.name != MESH_CONFIG_NAME {
        ck.err(
            &FieldPath::root().key("metadata").key("name"),
            format!(
                "a Mesh resource must be named {MESH_CONFIG_NAME:?} (there is one per mesh), not {:?}",
                mc.metadata.name
            ),
        );
    }
    if let Some(td) = &mc.spec.trust_domain {
        ck.check(
            &FieldPath::root().key("spec").key("trustDomain"),
            trust_domain(td),
        );
    }
}

/// A SPIFFE trust domain: 1..=255 of lowercase letters, digits, `.`, `-`, `_`.
pub(crate) fn trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() || td.len() > 255 {
        return Err(format!(
            "trust domain {td:?} must be 1 to 255 characters (e.g. \"cluster.local\")"
        ));
    }
    if !td.bytes().all(td_byte) {
        return Err(format!(
            "trust domain {td:?} may only hold lowercase letters, digits, '.', '-' and '_' (SPIFFE)"
        ));
    }
    Ok(())
}

fn td_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// A SPIFFE id `spiffe://<trust-domain>/<path>`: path segments of letters,
/// digits, `.`, `-`, `_`, none empty, `.` or `..`.
pub(crate) fn spiffe_id(s: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{s:?} is not a SPIFFE id ({why}); expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, or a pattern with one leading or trailing `*`"
        ))
    };
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return bad("it must start with spiffe://");
    };
    let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
    if trust_domain(td).is_err() {
        return bad("invalid trust domain");
    }
    if path.is_empty() {
        return bad("a workload id has a path after the trust domain");
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." || !seg.bytes().all(path_byte) {
            return bad("path segments are letters, digits, '.', '-', '_'");
        }
    }
    Ok(())
}

/// A principal: a SPIFFE id, `*`, `spiffe://...prefix*` or `*suffix`.
fn principal(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s == "*" {
        return Ok(());
    }
    let ok_chars = |p: &str| p.bytes().all(|b| path_byte(b) || b == b'/');
    if let Some(prefix) = s.strip_suffix('*') {
        let Some(rest) = prefix.strip_prefix("spiffe://") else {
            return Err(format!(
                "principal pattern {s:?} must start with spiffe:// (e.g. \"spiffe://cluster.local/ns/prod/*\")"
            ));
        };
        if rest.contains('*') || !ok_chars(rest) {
            return Err(format!("principal pattern {s:?}: only one `*`, at the start or the end, and SPIFFE characters (letters, digits, '.', '-', '_', '/')"));
        }
        return Ok(());
    }
    if let Some(suffix) = s.strip_prefix('*') {
        if suffix.contains('*')
            || !suffix
                .bytes()
                .all(|b| path_byte(b) || b == b'/' || b == b':')
        {
            return Err(format!("principal pattern {s:?}: only one `*`, at the start or the end, and SPIFFE characters (letters, digits, '.', '-', '_', '/')"));
        }
        return Ok(());
    }
    spiffe_id(s)
}

/// A namespace pattern: a DNS label, `*`, `prefix*` or `*suffix`.
fn namespace(s: &str) -> Result<(), String> {
    if s == "*" {
        return Ok(());
    }
    let body = s
        .strip_suffix('*')
        .or_else(|| s.strip_prefix('*'))
        .unwrap_or(s);
    if body.is_empty() {
        return Err("must not be empty".into());
    }
    if body.contains('*')
        || !body
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "namespace {s:?} must be a namespace name (lowercase letters, digits, '-'), with at most one `*` at the start or the end"
        ));
    }
    if body.len() == s.len() {
        checks::dns_label(s)?;
    }
    Ok(())
}

fn method(m: &str) -> Result<(), String> {
    if m.is_empty() {
        return Err("must not be empty".into());
    }
    if KNOWN_METHODS.contains(&m) {
        return Ok(());
    }
    let upper = m.to_ascii_uppercase();
    if KNOWN_METHODS.contains(&upper.as_str()) {
        return Err(format!(
            "method {m:?}: methods are case-sensitive; write {upper:?}"
        ));
    }
    if m.bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        // An extension method (WebDAV's PROPFIND, ...): a valid token.
        return Ok(());
    }
    Err(format!(
        "method {m:?} is not an HTTP method; expected one of {} (or another upper-case token)",
        KNOWN_METHODS.join(", ")
    ))
}

/// A path pattern: exact (`/a`), `prefix*`, `*suffix` or `*`.
fn path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("must not be empty".into());
    }
    if p == "*" {
        return Ok(());
    }
    if p.contains(['?', '#']) || p.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "path {p:?} must not contain '?', '#', spaces or control characters (paths are matched without the query)"
        ));
    }
    let stars = p.matches('*').count();
    if stars > 1 || (stars == 1 && !(p.starts_with('*') || p.ends_with('*'))) {
        return Err(format!(
            "path {p:?}: only one `*`, at the start (suffix match) or the end (prefix match)"
        ));
    }
    if !p.starts_with('*') && !p.starts_with('/') {
        return Err(format!("path {p:?} must start with '/' (or '*')"));
    }
    Ok(())
}

/// A header value pattern: exact, `prefix*`, `*suffix` or `*` (present).
fn header_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err("must not be empty (use \"*\" to require the header with any value)".into());
    }
    checks::header_value(v)?;
    if v != "*" {
        let stars = v.matches('*').count();
        if stars > 1 || (stars == 1 && !(v.starts_with('*') || v.ends_with('*'))) {
            return Err(format!(
                "value {v:?}: only one `*`, at the start (suffix match) or the end (prefix match)"
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_authz_policies(mesh: &Mesh, errors: &mut Errors) {
    for p in mesh.authorization_policies() {
        check_policy(mesh, p, errors);
    }
}

fn check_policy(mesh: &Mesh, p: &Sourced<AuthorizationPolicy>, errors: &mut Errors) {
    let ap = &p.value;
    let mut ck = Ck::new(p, label_of(Kind::AuthorizationPolicy, &ap.metadata), errors);
    let base = FieldPath::root().key("spec");
    let ns = &ap.metadata.namespace;
    let mut target: Option<&Service> = None;
    if let Some(tr) = &ap.spec.target_ref {
        let tpath = base.key("targetRef");
        if ck.service_ref(&tpath, tr, "an AuthorizationPolicy") {
            match mesh.service(ns, &tr.name) {
                Some(s) => target = Some(&s.value),
                None => ck.err(
                    &tpath.key("name"),
                    format!(
                        "Service {ns}/{} not found (an AuthorizationPolicy targets a Service of its own namespace; leave targetRef out to cover every Service of the namespace)",
                        tr.name
                    ),
                ),
            }
        }
    }
    for (i, rule) in ap.spec.rules.iter().enumerate() {
        let rp = base.key("rules").index(i);
        for (j, from) in rule.from.iter().enumerate() {
            check_source(&mut ck, from, &rp.key("from").index(j));
        }
        for (j, to) in rule.to.iter().enumerate() {
            check_operation(&mut ck, to, target, &rp.key("to").index(j));
        }
    }
}

fn check_source<T>(ck: &mut Ck<'_, T>, from: &AuthzSource, p: &FieldPath) {
    if from.principals.is_empty()
        && from.not_principals.is_empty()
        && from.namespaces.is_empty()
        && from.not_namespaces.is_empty()
    {
        ck.err(
            p,
            "set at least one of principals, notPrincipals, namespaces, notNamespaces (leave `from` out to match every source)",
        );
    }
    for (field, list) in [
        ("principals", &from.principals),
        ("notPrincipals", &from.not_principals),
    ] {
        for (k, v) in list.iter().enumerate() {
            ck.check(&p.key(field).index(k), principal(v));
        }
    }
    for (field, list) in [
        ("namespaces", &from.namespaces),
        ("notNamespaces", &from.not_namespaces),
    ] {
        for (k, v) in list.iter().enumerate() {
            ck.check(&p.key(field).index(k), namespace(v));
        }
    }
}

fn check_operation<T>(
    ck: &mut Ck<'_, T>,
    to: &AuthzOperation,
    target: Option<&Service>,
    p: &FieldPath,
) {
    if !to.has_l7() && to.ports.is_empty() {
        ck.err(
            p,
            "set at least one of ports, methods, paths, notPaths, grpc, headers (leave `to` out to match every request)",
        );
    }
    for (k, port) in to.ports.iter().enumerate() {
        let pp = p.key("ports").index(k);
        if *port == 0 || *port > 65535 {
            ck.err(&pp, format!("{port} is out of range: expected 1 to 65535"));
        } else if let Some(svc) = target {
            if svc.port(*port).is_none() {
                ck.err(
                    &pp,
                    format!(
                        "Service {}/{} has no port {port} (its ports: {}); ports are service port numbers",
                        svc.metadata.namespace,
                        svc.metadata.name,
                        list_ports(svc)
                    ),
                );
            }
        }
    }
    for (k, m) in to.methods.iter().enumerate() {
        ck.check(&p.key("methods").index(k), method(m));
    }
    for (field, list) in [("paths", &to.paths), ("notPaths", &to.not_paths)] {
        for (k, v) in list.iter().enumerate() {
            ck.check(&p.key(field).index(k), path(v));
        }
    }
    if let Some(g) = &to.grpc {
        let gp = p.key("grpc");
        ck.check(&gp.key("service"), checks::grpc_service(&g.service));
        if let Some(m) = &g.method {
            ck.check(&gp.key("method"), checks::grpc_method(m));
        }
        if !to.paths.is_empty() || !to.not_paths.is_empty() {
            ck.err(
                &gp,
                "grpc is a path match: use either grpc or paths/notPaths in one `to` entry (several entries are OR-ed)",
            );
        }
    }
    for (name, value) in &to.headers {
        let hp = p.key("headers").key(name);
        ck.check(&hp, checks::header_name(name));
        ck.check(&hp, header_value(value));
    }

    // HTTP fields where only TCP connections can arrive never match: refuse.
    if let (Some(svc), Some(field)) = (target, first_l7_field(to)) {
        let ports: Vec<_> = if to.ports.is_empty() {
            svc.spec.ports.iter().collect()
        } else {
            svc.spec
                .ports
                .iter()
                .filter(|sp| to.ports.contains(&sp.port))
                .collect()
        };
        if !ports.is_empty() && ports.iter().all(|sp| !sp.app_protocol.is_http()) {
            ck.err(
                &p.key(field),
                format!(
                    "{field} only applies to HTTP requests, but the {} of Service {}/{} {} tcp ({}): TCP connections are authorized on source identity and port only; remove {field} or name an http, http2 or grpc port",
                    if to.ports.is_empty() { "ports" } else { "selected ports" },
                    svc.metadata.namespace,
                    svc.metadata.name,
                    if ports.len() == 1 { "is" } else { "are all" },
                    list_ports(svc)
                ),
            );
        }
    }
}

fn first_l7_field(to: &AuthzOperation) -> Option<&'static str> {
    if !to.methods.is_empty() {
        Some("methods")
    } else if !to.paths.is_empty() {
        Some("paths")
    } else if !to.not_paths.is_empty() {
        Some("notPaths")
    } else if to.grpc.is_some() {
        Some("grpc")
    } else if !to.headers.is_empty() {
        Some("headers")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn spiffe_ids_and_patterns() {
        assert!(principal("spiffe://cluster.local/ns/a/sa/b").is_ok());
        assert!(principal("*").is_ok());
        assert!(principal("spiffe://cluster.local/ns/prod/*").is_ok());
        assert!(principal("*/sa/admin").is_ok());
        for bad in [
            "",
            "cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a",
            "spiffe://td",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../b",
            "spiffe://td/*/x",
            "*a*",
            "ns/*",
        ] {
            assert!(principal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trust_domains_namespaces_methods_paths() {
        assert!(trust_domain("example.org").is_ok());
        assert!(trust_domain("a_b-c.d").is_ok());
        assert!(trust_domain("Example.org").is_err());
        assert!(trust_domain("").is_err());
        assert!(namespace("prod").is_ok() && namespace("prod-*").is_ok() && namespace("*").is_ok());
        assert!(namespace("Prod").is_err() && namespace("a*b").is_err());
        assert!(method("GET").is_ok() && method("PROPFIND").is_ok());
        assert!(method("get").unwrap_err().contains("write \"GET\""));
        assert!(method("GE T").is_err());
        for ok in ["/a", "/api/*", "*.png", "*"] {
            assert!(path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "/a*b", "/a?x", "**"] {
            assert!(path(bad).is_err(), "{bad}");
        }
    }
}
