//! Route validation: HTTPRoute, GRPCRoute and TCPRoute.
//!
//! Implements the standard-channel CRD limits (`maxItems`, lengths, ranges),
//! patterns and the `x-kubernetes-validations` rules, plus meshwork's own
//! rules: parents must be Services, backends must resolve to a service port
//! of a compatible protocol, unsupported filters (CORS, ExtensionRef, and
//! anything but header modifiers inside `backendRefs[].filters`) are refused
//! rather than ignored, and ports carry one route type (HTTP or gRPC) and at
//! most one TCPRoute per scope.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{checks, label_of, Ck};
use crate::error::{Errors, FieldPath};
use crate::mesh::{backend_port, parent_ports, route_age_key, Key, Mesh, PortClass};
use crate::resources::{
    BackendView, GrpcFilterType, GrpcRouteFilter, HeaderMatch, HeaderModifier, HttpFilterType,
    HttpRouteFilter, HttpRouteMatch, Kind, MatchType, Metadata, ParentRef, PathMatchType,
    PathModifier, PathModifierType, RequestMirror, GATEWAY_V1,
};

/// Where an HTTPRoute's RequestMirror may point (see `check_http_filters`).
const HTTP_ROUTE: (&str, PortClass) = ("HTTPRoute", PortClass::Http);

/// Who sees a route on a port: everyone (producer route, same namespace as
/// the Service) or only clients of one namespace (consumer route).
type Scope = Option<String>;

/// A route claiming a port, for conflict detection.
struct Claim {
    kind: Kind,
    label: String,
    place: String,
    age: (bool, (i64, u32), String, String),
}

pub(crate) fn check_routes(mesh: &Mesh, errors: &mut Errors) {
    // (service, port, scope) -> routes attached there.
    let mut http_claims: BTreeMap<(Key, u32, Scope), Vec<Claim>> = BTreeMap::new();
    let mut tcp_claims: BTreeMap<(Key, u32, Scope), Vec<Claim>> = BTreeMap::new();

    for r in mesh.http_routes() {
        let route = &r.value;
        let mut ck = Ck::new(r, label_of(Kind::HttpRoute, &route.metadata), errors);
        let ns = route.metadata.namespace.as_str();
        let spec = FieldPath::root().key("spec");
        let attached = check_parents(
            &mut ck,
            mesh,
            &route.metadata,
            "HTTPRoute",
            &route.spec.parent_refs,
            PortClass::Http,
        );
        claim(
            &mut http_claims,
            attached,
            Kind::HttpRoute,
            &ck.label,
            r.place(),
            &route.metadata,
        );
        check_hostnames(&mut ck, &route.spec.hostnames, &spec.key("hostnames"));
        let rules_p = spec.key("rules");
        if route.spec.rules.is_empty() {
            ck.err(&rules_p, "at least one rule is required");
        }
        ck.max_items(&rules_p, &route.spec.rules, 16);
        let total: usize = route.spec.rules.iter().map(|r| r.matches.len()).sum();
        if total > 128 {
            ck.err(
                &rules_p,
                format!("at most 128 matches in total across all rules, found {total}"),
            );
        }
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let rp = rules_p.index(i);
            if let Some(n) = &rule.name {
                ck.check(&rp.key("name"), checks::dns_subdomain(n));
            }
            ck.max_items(&rp.key("matches"), &rule.matches, 64);
            for (j, m) in rule.matches.iter().enumerate() {
                check_http_match(&mut ck, m, &rp.key("matches").index(j));
            }
            check_http_filters(
                &mut ck,
                mesh,
                ns,
                &rule.filters,
                &rp.key("filters"),
                false,
                &rule.matches,
                HTTP_ROUTE,
            );
            let has_redirect = rule
                .filters
                .iter()
                .any(|f| f.kind == HttpFilterType::RequestRedirect);
            if has_redirect && !rule.backend_refs.is_empty() {
                ck.err(
                    &rp.key("backendRefs"),
                    "a rule with a RequestRedirect filter must not have backendRefs",
                );
            }
            if has_redirect
                && rule
                    .filters
                    .iter()
                    .any(|f| f.kind == HttpFilterType::RequestMirror)
            {
                ck.err(
                    &rp.key("filters"),
                    "RequestMirror cannot be combined with RequestRedirect: a redirected request is answered by the proxy and never forwarded",
                );
            }
            let bp = rp.key("backendRefs");
            ck.max_items(&bp, &rule.backend_refs, 16);
            for (j, b) in rule.backend_refs.iter().enumerate() {
                let p = bp.index(j);
                check_backend(
                    &mut ck,
                    mesh,
                    ns,
                    b.view(),
                    "HTTPRoute",
                    PortClass::Http,
                    &p,
                );
                check_http_filters(
                    &mut ck,
                    mesh,
                    ns,
                    &b.filters,
                    &p.key("filters"),
                    true,
                    &rule.matches,
                    HTTP_ROUTE,
                );
            }
            if let Some(t) = &rule.timeouts {
                if let (Some(req), Some(be)) = (t.request, t.backend_request) {
                    if !req.get().is_zero() && be > req {
                        ck.err(
                            &rp.key("timeouts").key("backendRequest"),
                            format!("backendRequest timeout {be} cannot be longer than the request timeout {req}"),
                        );
                    }
                }
            }
        }
    }

    for r in mesh.grpc_routes() {
        let route = &r.value;
        let mut ck = Ck::new(r, label_of(Kind::GrpcRoute, &route.metadata), errors);
        let ns = route.metadata.namespace.as_str();
        let spec = FieldPath::root().key("spec");
        let attached = check_parents(
            &mut ck,
            mesh,
            &route.metadata,
            "GRPCRoute",
            &route.spec.parent_refs,
            PortClass::Grpc,
        );
        claim(
            &mut http_claims,
            attached,
            Kind::GrpcRoute,
            &ck.label,
            r.place(),
            &route.metadata,
        );
        check_hostnames(&mut ck, &route.spec.hostnames, &spec.key("hostnames"));
        let rules_p = spec.key("rules");
        ck.max_items(&rules_p, &route.spec.rules, 16);
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let rp = rules_p.index(i);
            if let Some(n) = &rule.name {
                ck.check(&rp.key("name"), checks::dns_subdomain(n));
            }
            ck.max_items(&rp.key("matches"), &rule.matches, 64);
            for (j, m) in rule.matches.iter().enumerate() {
                let mp = rp.key("matches").index(j);
                if let Some(meth) = &m.method {
                    let pp = mp.key("method");
                    if meth.service.is_none() && meth.method.is_none() {
                        ck.err(&pp, "one or both of service and method must be specified");
                    }
                    for (field, v) in [("service", &meth.service), ("method", &meth.method)] {
                        let Some(v) = v else { continue };
                        if v.len() > 1024 {
                            ck.err(&pp.key(field), "longer than 1024 characters");
                            continue;
                        }
                        let res = match (meth.kind, field) {
                            (MatchType::Exact, "service") => checks::grpc_service(v),
                            (MatchType::Exact, _) => checks::grpc_method(v),
                            (MatchType::RegularExpression, _) => checks::regex(v).map(|_| ()),
                        };
                        ck.check(&pp.key(field), res);
                    }
                }
                check_header_matches(&mut ck, &m.headers, &mp.key("headers"), 4096);
            }
            check_grpc_filters(&mut ck, mesh, ns, &rule.filters, &rp.key("filters"), false);
            let bp = rp.key("backendRefs");
            ck.max_items(&bp, &rule.backend_refs, 16);
            for (j, b) in rule.backend_refs.iter().enumerate() {
                let p = bp.index(j);
                check_backend(
                    &mut ck,
                    mesh,
                    ns,
                    b.view(),
                    "GRPCRoute",
                    PortClass::Grpc,
                    &p,
                );
                check_grpc_filters(&mut ck, mesh, ns, &b.filters, &p.key("filters"), true);
            }
        }
    }

    for r in mesh.tcp_routes() {
        let route = &r.value;
        let mut ck = Ck::new(r, label_of(Kind::TcpRoute, &route.metadata), errors);
        let ns = route.metadata.namespace.as_str();
        let spec = FieldPath::root().key("spec");
        let attached = check_parents(
            &mut ck,
            mesh,
            &route.metadata,
            "TCPRoute",
            &route.spec.parent_refs,
            PortClass::Tcp,
        );
        claim(
            &mut tcp_claims,
            attached,
            Kind::TcpRoute,
            &ck.label,
            r.place(),
            &route.metadata,
        );
        let rules_p = spec.key("rules");
        let max_rules = if route.api_version == GATEWAY_V1 {
            1
        } else {
            16
        };
        if route.spec.rules.is_empty() {
            ck.err(&rules_p, "exactly one rule is required");
        } else if route.spec.rules.len() > max_rules {
            ck.err(
                &rules_p,
                format!(
                    "at most {max_rules} rule(s) allowed for {}, found {}",
                    route.api_version,
                    route.spec.rules.len()
                ),
            );
        } else if route.spec.rules.len() > 1 {
            ck.err(
                &rules_p,
                "meshwork supports exactly one rule per TCPRoute: TCP rules have no matches, so nothing could choose between them",
            );
        }
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let rp = rules_p.index(i);
            if let Some(n) = &rule.name {
                ck.check(&rp.key("name"), checks::dns_subdomain(n));
            }
            let bp = rp.key("backendRefs");
            if rule.backend_refs.is_empty() {
                ck.err(&bp, "at least one backendRef is required");
            }
            ck.max_items(&bp, &rule.backend_refs, 16);
            for (j, b) in rule.backend_refs.iter().enumerate() {
                check_backend(
                    &mut ck,
                    mesh,
                    ns,
                    b.view(),
                    "TCPRoute",
                    PortClass::Any,
                    &bp.index(j),
                );
            }
            if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
                ck.err(
                    &bp,
                    "every backendRef has weight 0: give at least one a positive weight",
                );
            }
        }
    }

    report_conflicts(mesh, http_claims, errors, |a, b| {
        if a.kind == b.kind {
            None
        } else {
            Some("HTTPRoutes and GRPCRoutes cannot share a service port (Gateway API: the older route wins)")
        }
    });
    report_conflicts(mesh, tcp_claims, errors, |_, _| {
        Some("a tcp service port takes one TCPRoute per namespace scope (Gateway API: the older route wins)")
    });
}

fn claim(
    claims: &mut BTreeMap<(Key, u32, Scope), Vec<Claim>>,
    attached: Vec<(Key, u32)>,
    kind: Kind,
    label: &str,
    place: String,
    meta: &Metadata,
) {
    for (svc, port) in attached {
        let scope = if svc.0 == meta.namespace {
            None
        } else {
            Some(meta.namespace.clone())
        };
        claims.entry((svc, port, scope)).or_default().push(Claim {
            kind,
            label: label.to_string(),
            place: place.clone(),
            age: route_age_key(meta),
        });
    }
}

/// Errors for every route that loses a port to an older one it conflicts with.
fn report_conflicts(
    mesh: &Mesh,
    claims: BTreeMap<(Key, u32, Scope), Vec<Claim>>,
    errors: &mut Errors,
    conflict: impl Fn(&Claim, &Claim) -> Option<&'static str>,
) {
    let mut reported: HashSet<(String, String)> = HashSet::new();
    for ((svc, port, _), mut cs) in claims {
        cs.sort_by(|a, b| a.age.cmp(&b.age));
        for (i, loser) in cs.iter().enumerate() {
            let Some((winner, why)) = cs[..i]
                .iter()
                .find_map(|w| conflict(w, loser).map(|why| (w, why)))
            else {
                continue;
            };
            if !reported.insert((loser.label.clone(), winner.label.clone())) {
                continue;
            }
            // Point at the loser's parentRefs.
            let target = find_route(mesh, loser);
            let msg = format!(
                "port {port} of Service {}/{} is already taken by {} ({}): {why}",
                svc.0, svc.1, winner.label, winner.place
            );
            if let Some(e) = target.map(|t| t(&msg)) {
                errors.push(e);
            }
        }
    }
}

type MakeErr<'m> = Box<dyn Fn(&str) -> crate::error::Error + 'm>;

fn find_route<'m>(mesh: &'m Mesh, c: &Claim) -> Option<MakeErr<'m>> {
    let (ns, name) = (c.age.2.clone(), c.age.3.clone());
    let path = FieldPath::root().key("spec").key("parentRefs");
    let label = c.label.clone();
    let key = (ns, name);
    match c.kind {
        Kind::HttpRoute => mesh.http_routes.get(&key).map(|r| {
            Box::new(move |m: &str| r.error(Some(label.clone()), &path, m)) as MakeErr<'m>
        }),
        Kind::GrpcRoute => mesh.grpc_routes.get(&key).map(|r| {
            Box::new(move |m: &str| r.error(Some(label.clone()), &path, m)) as MakeErr<'m>
        }),
        Kind::TcpRoute => mesh.tcp_routes.get(&key).map(|r| {
            Box::new(move |m: &str| r.error(Some(label.clone()), &path, m)) as MakeErr<'m>
        }),
        _ => None,
    }
}

/// Checks `parentRefs`; returns the (service, port) pairs the route attaches to.
fn check_parents<T>(
    ck: &mut Ck<'_, T>,
    mesh: &Mesh,
    meta: &Metadata,
    route_kind: &str,
    refs: &[ParentRef],
    class: PortClass,
) -> Vec<(Key, u32)> {
    let p = FieldPath::root().key("spec").key("parentRefs");
    if refs.is_empty() {
        ck.err(
            &p,
            "at least one parentRef is required: a mesh route attaches to a Service (`kind: Service`, `group: \"\"`, `name: ...`)",
        );
        return Vec::new();
    }
    ck.max_items(&p, refs, 32);
    let mut out = Vec::new();
    // Parent object -> (index, which optional fields are set, their values).
    type Opt = (bool, bool, Option<String>, Option<u32>);
    type Parent = (String, String, String, String);
    let mut same: HashMap<Parent, Vec<(usize, Opt)>> = HashMap::new();
    for (i, pr) in refs.iter().enumerate() {
        let rp = p.index(i);
        if let Some(ns) = &pr.namespace {
            ck.check(&rp.key("namespace"), checks::dns_label(ns));
        }
        if let Some(s) = &pr.section_name {
            ck.check(&rp.key("sectionName"), checks::dns_subdomain(s));
        }
        if let Some(port) = pr.port {
            ck.range(&rp.key("port"), port.into(), 1, 65535);
        }
        let obj = (
            pr.group
                .clone()
                .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
            pr.kind.clone().unwrap_or_else(|| "Gateway".into()),
            pr.namespace
                .clone()
                .unwrap_or_else(|| meta.namespace.clone()),
            pr.name.clone(),
        );
        let opt = (
            pr.section_name.is_some(),
            pr.port.is_some(),
            pr.section_name.clone(),
            pr.port,
        );
        let prev = same.entry(obj).or_default();
        for (j, o) in prev.iter() {
            if (o.0, o.1) != (opt.0, opt.1) {
                ck.err(
                    &rp,
                    format!("parentRefs[{j}] selects the same parent; all parentRefs to one parent must set the same fields (sectionName, port)"),
                );
            } else if o == &opt {
                ck.err(
                    &rp,
                    format!("duplicates parentRefs[{j}]: parentRefs must be distinct"),
                );
            }
        }
        prev.push((i, opt));
        match parent_ports(mesh, &meta.namespace, route_kind, pr, class) {
            Ok((svc, ports)) => {
                let key: Key = (
                    svc.value.metadata.namespace.clone(),
                    svc.value.metadata.name.clone(),
                );
                for sp in ports {
                    if !out.contains(&(key.clone(), sp.port)) {
                        out.push((key.clone(), sp.port));
                    }
                }
            }
            Err((field, msg)) => {
                let fp = if matches!(field, "kind" | "group" | "sectionName" | "port")
                    && field_set(pr, field)
                {
                    rp.key(field)
                } else {
                    rp.key("name")
                };
                ck.err(&fp, msg);
            }
        }
    }
    out
}

fn field_set(pr: &ParentRef, field: &str) -> bool {
    match field {
        "kind" => pr.kind.is_some(),
        "group" => pr.group.is_some(),
        "sectionName" => pr.section_name.is_some(),
        "port" => pr.port.is_some(),
        _ => true,
    }
}

fn check_hostnames<T>(ck: &mut Ck<'_, T>, hosts: &[String], p: &FieldPath) {
    ck.max_items(p, hosts, 16);
    for (i, h) in hosts.iter().enumerate() {
        ck.check(&p.index(i), checks::hostname(h, true));
    }
}

fn check_backend<T>(
    ck: &mut Ck<'_, T>,
    mesh: &Mesh,
    route_ns: &str,
    b: BackendView<'_>,
    route_kind: &str,
    class: PortClass,
    p: &FieldPath,
) {
    if b.weight > 1_000_000 {
        ck.err(
            &p.key("weight"),
            format!("{} is out of range: expected 0 to 1000000", b.weight),
        );
    }
    if let Some(ns) = b.namespace {
        ck.check(&p.key("namespace"), checks::dns_label(ns));
    }
    if let Some(port) = b.port {
        if port == 0 || port > 65535 {
            ck.err(
                &p.key("port"),
                format!("{port} is out of range: expected 1 to 65535"),
            );
            return;
        }
    }
    if let Err((field, msg)) = backend_port(mesh, route_ns, b, route_kind, class) {
        ck.err(&p.key(field), msg);
    }
}

fn check_http_match<T>(ck: &mut Ck<'_, T>, m: &HttpRouteMatch, p: &FieldPath) {
    let pp = p.key("path");
    match m.path.kind {
        PathMatchType::Exact | PathMatchType::PathPrefix => {
            ck.check(&pp.key("value"), checks::match_path(&m.path.value));
        }
        PathMatchType::RegularExpression => {
            if m.path.value.len() > 1024 {
                ck.err(&pp.key("value"), "longer than 1024 characters");
            } else {
                ck.check(&pp.key("value"), checks::regex(&m.path.value).map(|_| ()));
            }
        }
    }
    check_header_matches(ck, &m.headers, &p.key("headers"), 4096);
    check_header_matches(ck, &m.query_params, &p.key("queryParams"), 1024);
}

/// Header or query parameter matches: names, values, regexes, list-map keys.
fn check_header_matches<T>(
    ck: &mut Ck<'_, T>,
    hs: &[HeaderMatch],
    p: &FieldPath,
    max_value: usize,
) {
    ck.max_items(p, hs, 16);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, h) in hs.iter().enumerate() {
        let hp = p.index(i);
        ck.check(&hp.key("name"), checks::header_name(&h.name));
        if let Some(j) = seen.insert(&h.name, i) {
            ck.err(
                &hp.key("name"),
                format!(
                    "{:?} is already matched by entry [{j}]; names must be unique",
                    h.name
                ),
            );
        }
        if h.value.is_empty() || h.value.len() > max_value {
            ck.err(
                &hp.key("value"),
                format!("must be 1 to {max_value} characters"),
            );
            continue;
        }
        match h.kind {
            MatchType::Exact => ck.check(&hp.key("value"), checks::header_value(&h.value)),
            MatchType::RegularExpression => {
                ck.check(&hp.key("value"), checks::regex(&h.value).map(|_| ()))
            }
        }
    }
}

/// Which filter fields are set, by their YAML names.
fn set_fields(f: &HttpRouteFilter) -> Vec<&'static str> {
    let mut v = Vec::new();
    if f.request_header_modifier.is_some() {
        v.push("requestHeaderModifier");
    }
    if f.response_header_modifier.is_some() {
        v.push("responseHeaderModifier");
    }
    if f.request_mirror.is_some() {
        v.push("requestMirror");
    }
    if f.request_redirect.is_some() {
        v.push("requestRedirect");
    }
    if f.url_rewrite.is_some() {
        v.push("urlRewrite");
    }
    if f.extension_ref.is_some() {
        v.push("extensionRef");
    }
    if f.cors.is_some() {
        v.push("cors");
    }
    v
}

fn http_field_of(t: HttpFilterType) -> &'static str {
    match t {
        HttpFilterType::RequestHeaderModifier => "requestHeaderModifier",
        HttpFilterType::ResponseHeaderModifier => "responseHeaderModifier",
        HttpFilterType::RequestMirror => "requestMirror",
        HttpFilterType::RequestRedirect => "requestRedirect",
        HttpFilterType::UrlRewrite => "urlRewrite",
        HttpFilterType::ExtensionRef => "extensionRef",
        HttpFilterType::Cors => "cors",
    }
}

/// GRPCRoute filter types are a subset of HTTPRoute's, with the same fields,
/// so they are checked as HTTPRoute filters; only a mirror's backend is held
/// to gRPC ports.
fn check_grpc_filters<T>(
    ck: &mut Ck<'_, T>,
    mesh: &Mesh,
    route_ns: &str,
    filters: &[GrpcRouteFilter],
    p: &FieldPath,
    backend_level: bool,
) {
    let as_http: Vec<HttpRouteFilter> = filters
        .iter()
        .map(|f| HttpRouteFilter {
            kind: match f.kind {
                GrpcFilterType::RequestHeaderModifier => HttpFilterType::RequestHeaderModifier,
                GrpcFilterType::ResponseHeaderModifier => HttpFilterType::ResponseHeaderModifier,
                GrpcFilterType::RequestMirror => HttpFilterType::RequestMirror,
                GrpcFilterType::ExtensionRef => HttpFilterType::ExtensionRef,
            },
            request_header_modifier: f.request_header_modifier.clone(),
            response_header_modifier: f.response_header_modifier.clone(),
            request_mirror: f.request_mirror.clone(),
            request_redirect: None,
            url_rewrite: None,
            extension_ref: f.extension_ref.clone(),
            cors: None,
        })
        .collect();
    // No matches: they only matter to RequestRedirect and URLRewrite.
    let route = ("GRPCRoute", PortClass::Grpc);
    check_http_filters(ck, mesh, route_ns, &as_http, p, backend_level, &[], route);
}

/// Checks an HTTPRoute filter list, or a GRPCRoute one converted to it:
/// `route_kind` and `class` say where a RequestMirror may point.
#[allow(clippy::too_many_arguments)]
fn check_http_filters<T>(
    ck: &mut Ck<'_, T>,
    mesh: &Mesh,
    route_ns: &str,
    filters: &[HttpRouteFilter],
    p: &FieldPath,
    backend_level: bool,
    matches: &[HttpRouteMatch],
    (route_kind, class): (&str, PortClass),
) {
    ck.max_items(p, filters, 16);
    let mut count: HashMap<HttpFilterType, usize> = HashMap::new();
    for (i, f) in filters.iter().enumerate() {
        let fp = p.index(i);
        let want = http_field_of(f.kind);
        for field in set_fields(f) {
            if field != want {
                ck.err(
                    &fp.key(field),
                    format!("must not be set when type is {}", f.kind.as_str()),
                );
            }
        }
        let n = count.entry(f.kind).or_insert(0);
        *n += 1;
        if *n == 2 && f.kind != HttpFilterType::RequestMirror {
            ck.err(
                &fp.key("type"),
                format!("{} filter cannot be repeated", f.kind.as_str()),
            );
        }
        if backend_level
            && !matches!(
                f.kind,
                HttpFilterType::RequestHeaderModifier | HttpFilterType::ResponseHeaderModifier
            )
        {
            ck.err(
                &fp.key("type"),
                format!(
                    "{} is not supported in backendRefs[].filters: only RequestHeaderModifier and ResponseHeaderModifier (put it in the rule's filters)",
                    f.kind.as_str()
                ),
            );
            continue;
        }
        let missing = |ck: &mut Ck<'_, T>| {
            ck.err(
                &fp.key(want),
                format!("must be set when type is {}", f.kind.as_str()),
            );
        };
        match f.kind {
            HttpFilterType::RequestHeaderModifier => match &f.request_header_modifier {
                Some(h) => check_header_modifier(ck, h, &fp.key(want), true),
                None => missing(ck),
            },
            HttpFilterType::ResponseHeaderModifier => match &f.response_header_modifier {
                Some(h) => check_header_modifier(ck, h, &fp.key(want), false),
                None => missing(ck),
            },
            HttpFilterType::RequestMirror => match &f.request_mirror {
                Some(m) => check_mirror(ck, mesh, route_ns, m, &fp.key(want), route_kind, class),
                None => missing(ck),
            },
            HttpFilterType::RequestRedirect => {
                match &f.request_redirect {
                    Some(r) => {
                        let rp = fp.key(want);
                        if let Some(h) = &r.hostname {
                            ck.check(&rp.key("hostname"), checks::hostname(h, false));
                        }
                        if let Some(port) = r.port {
                            ck.range(&rp.key("port"), port.into(), 1, 65535);
                        }
                        if ![301, 302, 303, 307, 308].contains(&r.status_code) {
                            ck.err(
                            &rp.key("statusCode"),
                            format!("{} is not a redirect status: expected 301, 302, 303, 307 or 308", r.status_code),
                        );
                        }
                        if let Some(pm) = &r.path {
                            check_path_modifier(ck, pm, &rp.key("path"), matches);
                        }
                    }
                    None => missing(ck),
                }
            }
            HttpFilterType::UrlRewrite => match &f.url_rewrite {
                Some(r) => {
                    let rp = fp.key(want);
                    if let Some(h) = &r.hostname {
                        ck.check(&rp.key("hostname"), checks::hostname(h, false));
                    }
                    if let Some(pm) = &r.path {
                        check_path_modifier(ck, pm, &rp.key("path"), matches);
                    }
                }
                None => missing(ck),
            },
            HttpFilterType::ExtensionRef | HttpFilterType::Cors => {
                ck.err(
                    &fp.key("type"),
                    format!("{} filters are not supported by meshwork", f.kind.as_str()),
                );
            }
        }
    }
    if count.contains_key(&HttpFilterType::RequestRedirect)
        && count.contains_key(&HttpFilterType::UrlRewrite)
    {
        ck.err(
            p,
            "RequestRedirect and URLRewrite filters cannot be used together",
        );
    }
}

fn check_header_modifier<T>(ck: &mut Ck<'_, T>, h: &HeaderModifier, p: &FieldPath, request: bool) {
    let mut names: HashMap<String, String> = HashMap::new();
    for (field, list) in [("set", &h.set), ("add", &h.add)] {
        let lp = p.key(field);
        ck.max_items(&lp, list, 16);
        for (i, hh) in list.iter().enumerate() {
            let ip = lp.index(i);
            ck.check(&ip.key("name"), checks::header_name(&hh.name));
            if hh.value.is_empty() || hh.value.len() > 4096 {
                ck.err(&ip.key("value"), "must be 1 to 4096 characters");
            } else {
                ck.check(&ip.key("value"), checks::header_value(&hh.value));
            }
            let lower = hh.name.to_ascii_lowercase();
            if request && lower == "host" {
                ck.err(
                    &ip.key("name"),
                    "the Host header cannot be changed by a header modifier; use a URLRewrite filter with `hostname`",
                );
            }
            if let Some(prev) = names.insert(lower, format!("{field}[{i}]")) {
                ck.err(
                    &ip.key("name"),
                    format!(
                        "header {:?} is already modified by {prev} (names are case-insensitive)",
                        hh.name
                    ),
                );
            }
        }
    }
    let rp = p.key("remove");
    ck.max_items(&rp, &h.remove, 16);
    let mut removed: HashSet<String> = HashSet::new();
    for (i, name) in h.remove.iter().enumerate() {
        ck.check(&rp.index(i), checks::header_name(name));
        let lower = name.to_ascii_lowercase();
        if request && lower == "host" {
            ck.err(&rp.index(i), "the Host header cannot be removed");
        }
        if !removed.insert(lower) {
            ck.err(&rp.index(i), format!("{name:?} is listed twice"));
        }
    }
}

fn check_mirror<T>(
    ck: &mut Ck<'_, T>,
    mesh: &Mesh,
    route_ns: &str,
    m: &RequestMirror,
    p: &FieldPath,
    route_kind: &str,
    class: PortClass,
) {
    check_backend(
        ck,
        mesh,
        route_ns,
        m.backend_ref.view(),
        route_kind,
        class,
        &p.key("backendRef"),
    );
    if m.percent.is_some() && m.fraction.is_some() {
        ck.err(p, "only one of percent and fraction may be specified");
    }
    if let Some(pc) = m.percent {
        ck.range(&p.key("percent"), pc.into(), 0, 100);
    }
    if let Some(f) = &m.fraction {
        let fp = p.key("fraction");
        if f.denominator == 0 {
            ck.err(&fp.key("denominator"), "must be at least 1");
        }
        if f.numerator > f.denominator {
            ck.err(
                &fp.key("numerator"),
                format!(
                    "{} is larger than the denominator {}",
                    f.numerator, f.denominator
                ),
            );
        }
        if f.numerator > i32::MAX as u32 || f.denominator > i32::MAX as u32 {
            ck.err(&fp, "numerator and denominator must fit in an int32");
        }
    }
}

fn check_path_modifier<T>(
    ck: &mut Ck<'_, T>,
    pm: &PathModifier,
    p: &FieldPath,
    matches: &[HttpRouteMatch],
) {
    match pm.kind {
        PathModifierType::ReplaceFullPath => {
            if pm.replace_prefix_match.is_some() {
                ck.err(
                    &p.key("replacePrefixMatch"),
                    "must not be set when type is ReplaceFullPath",
                );
            }
            match &pm.replace_full_path {
                Some(v) => ck.check(
                    &p.key("replaceFullPath"),
                    checks::replacement_path(v, false),
                ),
                None => ck.err(
                    &p.key("replaceFullPath"),
                    "must be set when type is ReplaceFullPath",
                ),
            }
        }
        PathModifierType::ReplacePrefixMatch => {
            if pm.replace_full_path.is_some() {
                ck.err(
                    &p.key("replaceFullPath"),
                    "must not be set when type is ReplacePrefixMatch",
                );
            }
            match &pm.replace_prefix_match {
                Some(v) => ck.check(
                    &p.key("replacePrefixMatch"),
                    checks::replacement_path(v, true),
                ),
                None => ck.err(
                    &p.key("replacePrefixMatch"),
                    "must be set when type is ReplacePrefixMatch",
                ),
            }
            let one_prefix =
                matches.len() == 1 && matches[0].path.kind == PathMatchType::PathPrefix;
            if !one_prefix {
                ck.err(
                    &p.key("type"),
                    "ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix",
                );
            }
        }
    }
}
