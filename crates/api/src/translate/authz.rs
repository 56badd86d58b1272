//! AuthorizationPolicies -> Envoy RBAC filters on the inbound listener.
//!
//! Contract (`docs/authorization.md`, "How it maps to Envoy"): per filter
//! chain of the inbound listener, in this order,
//! 1. an audit filter carrying only `shadow_rules` (action DENY, the AUDIT
//!    policies; `shadow_rules_stat_prefix: meshwork_audit_`), so audits see
//!    every request, even those denied next;
//! 2. a DENY filter (the DENY policies);
//! 3. an ALLOW filter (the ALLOW policies), present whenever an ALLOW policy
//!    applies to the service, or, with none, when the Mesh default action is
//!    `deny` (then it has no policies: default deny).
//!
//! Each rule of a policy becomes one RBAC policy named
//! `<namespace>/<name>/rules[<i>]`, so a decision names its resource.
//! Ports are service ports, resolved at translation time per chain: the TCP
//! chain always serves the service's first port; on the HTTP chain a port
//! is the virtual host a request lands in, which is the `:authority` the
//! inbound route configuration routes on (case-insensitive). HTTP-only
//! conditions on the TCP chain: an ALLOW `to` entry that has them cannot
//! match; DENY and AUDIT entries drop them and match more (fail closed, as
//! Istio does).

use std::collections::HashMap;

use envoy_types::pb::envoy::config::listener::v3::{filter, Filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac::Action, Permission, Policy, Principal, Rbac,
};
use envoy_types::pb::envoy::config::route::v3::{header_matcher, HeaderMatcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    path_matcher, string_matcher::MatchPattern, PathMatcher, StringMatcher,
};

use super::util::{any, regex_matcher};
use crate::mesh::Mesh;
use crate::resources::{
    AuthorizationPolicy, AuthzAction, AuthzOperation, AuthzSource, DefaultAction, Service,
    ServicePort,
};
use crate::source::Sourced;

/// Name of the HTTP RBAC filter.
pub(crate) const HTTP_RBAC: &str = "envoy.filters.http.rbac";
/// Name of the network RBAC filter.
pub(crate) const NETWORK_RBAC: &str = "envoy.filters.network.rbac";
/// `shadow_rules_stat_prefix` of the audit filter.
pub(crate) const AUDIT_STAT_PREFIX: &str = "meshwork_audit_";

/// The RBAC filters of the inbound listener's two chains.
#[derive(Default)]
pub(crate) struct InboundRbac {
    /// HTTP filters to put before the router.
    pub(crate) http: Vec<HttpFilter>,
    /// Network filters to put before tcp_proxy.
    pub(crate) tcp: Vec<Filter>,
}

/// Which chain a filter set is for.
enum Chain<'a> {
    /// HTTP: the inbound virtual hosts, (service port, domains); `None`
    /// domains is the catch-all (`*`) virtual host.
    Http(&'a [(u32, Option<Vec<String>>)]),
    /// TCP: every connection goes to this service port.
    Tcp(u32),
}

/// The RBAC filters for the inbound listener of a workload of `svc`.
/// `vhosts`: the inbound virtual hosts as `routes::inbound` makes them;
/// `ports`: the service's ports (the TCP chain serves the first).
pub(crate) fn inbound(
    mesh: &Mesh,
    svc: &Service,
    vhosts: &[(u32, Option<Vec<String>>)],
    ports: &[&ServicePort],
) -> InboundRbac {
    let (ns, name) = (&svc.metadata.namespace, &svc.metadata.name);
    let policies: Vec<&Sourced<AuthorizationPolicy>> =
        mesh.authorization_policies_for(ns, name).collect();
    let default_deny = mesh.default_action() == DefaultAction::Deny;
    if policies.is_empty() && !default_deny {
        return InboundRbac::default();
    }
    let mut out = InboundRbac::default();
    if !vhosts.is_empty() {
        for rbac in filters(&policies, default_deny, &Chain::Http(vhosts)) {
            out.http.push(HttpFilter {
                name: HTTP_RBAC.to_string(),
                config_type: Some(http_filter::ConfigType::TypedConfig(any(&rbac.http()))),
                ..Default::default()
            });
        }
    }
    if let Some(first) = ports.first() {
        for rbac in filters(&policies, default_deny, &Chain::Tcp(first.port)) {
            out.tcp.push(Filter {
                name: NETWORK_RBAC.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&rbac.network()))),
            });
        }
    }
    out
}

/// One RBAC filter: enforced rules or shadow (audit) rules.
enum RbacFilter {
    Enforce(Rbac),
    Shadow(Rbac),
}

impl RbacFilter {
    fn http(self) -> HttpRbac {
        match self {
            RbacFilter::Enforce(r) => HttpRbac {
                rules: Some(r),
                ..Default::default()
            },
            RbacFilter::Shadow(r) => HttpRbac {
                shadow_rules: Some(r),
                shadow_rules_stat_prefix: AUDIT_STAT_PREFIX.to_string(),
                ..Default::default()
            },
        }
    }

    fn network(self) -> NetworkRbac {
        match self {
            RbacFilter::Enforce(r) => NetworkRbac {
                stat_prefix: "inbound".to_string(),
                rules: Some(r),
                ..Default::default()
            },
            RbacFilter::Shadow(r) => NetworkRbac {
                stat_prefix: "inbound".to_string(),
                shadow_rules: Some(r),
                shadow_rules_stat_prefix: AUDIT_STAT_PREFIX.to_string(),
                ..Default::default()
            },
        }
    }
}

fn filters(
    policies: &[&Sourced<AuthorizationPolicy>],
    default_deny: bool,
    chain: &Chain<'_>,
) -> Vec<RbacFilter> {
    let of = |action: AuthzAction| -> (bool, HashMap<String, Policy>) {
        let mut any_applies = false;
        let mut map = HashMap::new();
        for p in policies.iter().filter(|p| p.value.spec.action == action) {
            any_applies = true;
            let m = &p.value.metadata;
            for (i, rule) in p.value.spec.rules.iter().enumerate() {
                if let Some(policy) = rule_policy(&rule.from, &rule.to, action, chain) {
                    map.insert(format!("{}/{}/rules[{i}]", m.namespace, m.name), policy);
                }
            }
        }
        (any_applies, map)
    };
    let mut out = Vec::new();
    let (_, audit) = of(AuthzAction::Audit);
    if !audit.is_empty() {
        out.push(RbacFilter::Shadow(Rbac {
            action: Action::Deny as i32,
            policies: audit,
            ..Default::default()
        }));
    }
    let (_, deny) = of(AuthzAction::Deny);
    if !deny.is_empty() {
        out.push(RbacFilter::Enforce(Rbac {
            action: Action::Deny as i32,
            policies: deny,
            ..Default::default()
        }));
    }
    let (allow_applies, allow) = of(AuthzAction::Allow);
    if allow_applies || default_deny {
        out.push(RbacFilter::Enforce(Rbac {
            action: Action::Allow as i32,
            policies: allow,
            ..Default::default()
        }));
    }
    out
}

/// The RBAC policy of one rule on `chain`, or `None` when the rule cannot
/// match there (so it is left out).
fn rule_policy(
    from: &[AuthzSource],
    to: &[AuthzOperation],
    action: AuthzAction,
    chain: &Chain<'_>,
) -> Option<Policy> {
    let permissions = if to.is_empty() {
        vec![perm_any()]
    } else {
        let v: Vec<Permission> = to
            .iter()
            .filter_map(|op| operation(op, action, chain))
            .collect();
        if v.is_empty() {
            return None;
        }
        v
    };
    let principals = if from.is_empty() {
        vec![Principal {
            identifier: Some(principal::Identifier::Any(true)),
        }]
    } else {
        from.iter().map(source).collect()
    };
    Some(Policy {
        permissions,
        principals,
        ..Default::default()
    })
}

fn perm_any() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn perm_and(mut v: Vec<Permission>) -> Permission {
    match v.len() {
        0 => perm_any(),
        1 => v.remove(0),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules: v })),
        },
    }
}

fn perm_or(mut v: Vec<Permission>) -> Permission {
    if v.len() == 1 {
        return v.remove(0);
    }
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules: v })),
    }
}

fn perm_not(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

fn string(pattern: MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    }
}

/// `*` any, `x*` prefix, `*x` suffix, else exact. (`*` alone is handled
/// by callers, which know what "any" means for them.)
fn wildcard(v: &str) -> StringMatcher {
    if let Some(p) = v.strip_suffix('*') {
        string(MatchPattern::Prefix(p.to_string()))
    } else if let Some(s) = v.strip_prefix('*') {
        string(MatchPattern::Suffix(s.to_string()))
    } else {
        string(MatchPattern::Exact(v.to_string()))
    }
}

fn url_path(m: StringMatcher) -> Permission {
    Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(m)),
        })),
    }
}

fn header(name: &str, spec: header_matcher::HeaderMatchSpecifier) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: name.to_string(),
            header_match_specifier: Some(spec),
            ..Default::default()
        })),
    }
}

fn paths(list: &[String]) -> Permission {
    perm_or(
        list.iter()
            .map(|p| {
                if p == "*" {
                    perm_any()
                } else {
                    url_path(wildcard(p))
                }
            })
            .collect(),
    )
}

/// The permission of one `to` entry on `chain`; `None` if it cannot match.
fn operation(op: &AuthzOperation, action: AuthzAction, chain: &Chain<'_>) -> Option<Permission> {
    let mut and = Vec::new();
    match chain {
        Chain::Tcp(port) => {
            if !op.ports.is_empty() && !op.ports.contains(port) {
                return None;
            }
            if op.has_l7() && action == AuthzAction::Allow {
                return None;
            }
            // DENY/AUDIT: HTTP-only conditions are dropped (fail closed).
            return Some(perm_any());
        }
        Chain::Http(vhosts) => {
            if !op.ports.is_empty() {
                let (inside, outside): (Vec<_>, Vec<_>) =
                    vhosts.iter().partition(|(p, _)| op.ports.contains(p));
                if inside.is_empty() {
                    return None;
                }
                if !outside.is_empty() {
                    let authority = |doms: &[String]| -> Vec<Permission> {
                        doms.iter()
                            .map(|d| {
                                header(
                                    ":authority",
                                    header_matcher::HeaderMatchSpecifier::StringMatch(
                                        StringMatcher {
                                            match_pattern: Some(MatchPattern::Exact(d.clone())),
                                            ignore_case: true,
                                        },
                                    ),
                                )
                            })
                            .collect()
                    };
                    if inside.iter().any(|(_, d)| d.is_none()) {
                        // The catch-all host is in: anything but the others.
                        let others: Vec<String> = outside
                            .iter()
                            .filter_map(|(_, d)| d.clone())
                            .flatten()
                            .collect();
                        and.push(perm_not(perm_or(authority(&others))));
                    } else {
                        let mine: Vec<String> = inside
                            .iter()
                            .filter_map(|(_, d)| d.clone())
                            .flatten()
                            .collect();
                        and.push(perm_or(authority(&mine)));
                    }
                }
            }
        }
    }
    if !op.methods.is_empty() {
        and.push(perm_or(
            op.methods
                .iter()
                .map(|m| {
                    header(
                        ":method",
                        header_matcher::HeaderMatchSpecifier::StringMatch(string(
                            MatchPattern::Exact(m.clone()),
                        )),
                    )
                })
                .collect(),
        ));
    }
    if !op.paths.is_empty() {
        and.push(paths(&op.paths));
    }
    if !op.not_paths.is_empty() {
        and.push(perm_not(paths(&op.not_paths)));
    }
    if let Some(g) = &op.grpc {
        let m = match &g.method {
            Some(method) => MatchPattern::Exact(format!("/{}/{method}", g.service)),
            None => MatchPattern::Prefix(format!("/{}/", g.service)),
        };
        and.push(url_path(string(m)));
    }
    for (name, value) in &op.headers {
        let spec = if value == "*" {
            header_matcher::HeaderMatchSpecifier::PresentMatch(true)
        } else {
            header_matcher::HeaderMatchSpecifier::StringMatch(wildcard(value))
        };
        and.push(header(&name.to_ascii_lowercase(), spec));
    }
    Some(perm_and(and))
}

fn id_authenticated(m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(m),
            },
        )),
    }
}

fn id_or(mut v: Vec<Principal>) -> Principal {
    if v.len() == 1 {
        return v.remove(0);
    }
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids: v })),
    }
}

fn id_not(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn principal_matcher(p: &str) -> StringMatcher {
    if p == "*" {
        // Any authenticated (SPIFFE) peer.
        string(MatchPattern::Prefix("spiffe://".to_string()))
    } else {
        wildcard(p)
    }
}

/// `spiffe://<any trust domain>/ns/<namespace pattern>/sa/<any>`.
fn namespace_matcher(ns: &str) -> StringMatcher {
    let part = if ns == "*" {
        "[^/]+".to_string()
    } else if let Some(p) = ns.strip_suffix('*') {
        format!("{p}[^/]*")
    } else if let Some(s) = ns.strip_prefix('*') {
        format!("[^/]*{s}")
    } else {
        ns.to_string()
    };
    string(MatchPattern::SafeRegex(regex_matcher(&format!(
        "spiffe://[^/]+/ns/{part}/sa/[^/]+"
    ))))
}

fn source(from: &AuthzSource) -> Principal {
    let mut and = Vec::new();
    let list = |v: &[String], f: fn(&str) -> StringMatcher| {
        id_or(v.iter().map(|x| id_authenticated(f(x))).collect())
    };
    if !from.principals.is_empty() {
        and.push(list(&from.principals, principal_matcher));
    }
    if !from.not_principals.is_empty() {
        and.push(id_not(list(&from.not_principals, principal_matcher)));
    }
    if !from.namespaces.is_empty() {
        and.push(list(&from.namespaces, namespace_matcher));
    }
    if !from.not_namespaces.is_empty() {
        and.push(id_not(list(&from.not_namespaces, namespace_matcher)));
    }
    match and.len() {
        0 => Principal {
            identifier: Some(principal::Identifier::Any(true)),
        },
        1 => and.remove(0),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids: and })),
        },
    }
}
