//! RouteConfigurations: the outbound one (a virtual host per HTTP-ish service
//! port, routes from the HTTPRoutes/GRPCRoutes attached to it, sorted by
//! Gateway API precedence) and the inbound one (to the local application).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource, RuntimeFractionalPercent};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, query_parameter_matcher, redirect_action, route, route_action, route_match,
    weighted_cluster::ClusterWeight, DirectResponseAction, HeaderMatcher, QueryParameterMatcher,
    RedirectAction, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};

use super::names;
use super::resilience;
use super::util::{any, exact, pb_duration, regex_matcher, regex_string, u32v, HeaderOps};
use super::ProxyContext;
use crate::effective::{EffectivePolicy, Supplied, Supplier};
use crate::mesh::{backend_port, parent_ports, route_age_key, Key, Mesh, PolicyTarget, PortClass};
use crate::resources::{
    BackendView, GrpcFilterType, GrpcRoute, HeaderMatch, HeaderModifier, HttpFilterType, HttpRoute,
    HttpRouteFilter, HttpRouteMatch, MatchType, ParentRef, PathMatchType, PathModifier,
    PathModifierType, RateLimit, RequestMirror, RequestRedirect, Service, ServicePort, TcpRoute,
};
use crate::source::Sourced;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;

/// A route attached to a service port.
#[derive(Clone, Copy)]
pub(crate) enum Attached<'m> {
    Http(&'m Sourced<HttpRoute>),
    Grpc(&'m Sourced<GrpcRoute>),
    Tcp(&'m Sourced<TcpRoute>),
}

impl<'m> Attached<'m> {
    fn namespace(&self) -> &str {
        match self {
            Attached::Http(r) => &r.value.metadata.namespace,
            Attached::Grpc(r) => &r.value.metadata.namespace,
            Attached::Tcp(r) => &r.value.metadata.namespace,
        }
    }

    /// The route's kind, the class of port its parents must have, and its
    /// parentRefs.
    fn parents(&self) -> (&'static str, PortClass, &'m [ParentRef]) {
        match self {
            Attached::Http(r) => ("HTTPRoute", PortClass::Http, &r.value.spec.parent_refs),
            Attached::Grpc(r) => ("GRPCRoute", PortClass::Grpc, &r.value.spec.parent_refs),
            Attached::Tcp(r) => ("TCPRoute", PortClass::Tcp, &r.value.spec.parent_refs),
        }
    }
}

/// Which routes attach to which (service, port).
pub(crate) struct Attachments<'m> {
    by_port: BTreeMap<(Key, u32), Vec<Attached<'m>>>,
}

impl<'m> Attachments<'m> {
    pub(crate) fn new(mesh: &'m Mesh) -> Self {
        let mut by_port: BTreeMap<(Key, u32), Vec<Attached<'m>>> = BTreeMap::new();
        let routes = mesh
            .http_routes()
            .map(Attached::Http)
            .chain(mesh.grpc_routes().map(Attached::Grpc))
            .chain(mesh.tcp_routes().map(Attached::Tcp));
        for a in routes {
            let (kind, class, refs) = a.parents();
            let mut seen = Vec::new();
            for pr in refs {
                if let Ok((svc, ports)) = parent_ports(mesh, a.namespace(), kind, pr, class) {
                    let key: Key = (
                        svc.value.metadata.namespace.clone(),
                        svc.value.metadata.name.clone(),
                    );
                    for p in ports {
                        let k = (key.clone(), p.port);
                        if !seen.contains(&k) {
                            seen.push(k.clone());
                            by_port.entry(k).or_default().push(a);
                        }
                    }
                }
            }
        }
        Attachments { by_port }
    }

    /// The routes a client in `client_ns` sees on a port (GAMMA): its own
    /// namespace's consumer routes if there are any, else the producer routes
    /// (those in the Service's namespace).
    pub(crate) fn visible(&self, svc: &Service, port: u32, client_ns: &str) -> Vec<Attached<'m>> {
        let key: Key = (svc.metadata.namespace.clone(), svc.metadata.name.clone());
        let Some(all) = self.by_port.get(&(key, port)) else {
            return Vec::new();
        };
        let svc_ns = svc.metadata.namespace.as_str();
        let consumer: Vec<_> = all
            .iter()
            .copied()
            .filter(|a| client_ns != svc_ns && a.namespace() == client_ns)
            .collect();
        if !consumer.is_empty() {
            return consumer;
        }
        all.iter()
            .copied()
            .filter(|a| a.namespace() == svc_ns)
            .collect()
    }
}

/// Precedence of one route entry; smaller sorts first.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    specificity: Vec<i64>,
    age: (bool, (i64, u32), String, String),
    rule: usize,
    m: usize,
}

struct Entry {
    key: SortKey,
    route: Route,
}

/// The outbound RouteConfiguration `outbound_http`.
pub(crate) fn outbound(
    mesh: &Mesh,
    att: &Attachments<'_>,
    ctx: &ProxyContext,
) -> RouteConfiguration {
    let client_ns = ctx.client_namespace();
    let mut vhosts = Vec::new();
    for s in mesh.services() {
        let svc = &s.value;
        let first_http = svc.first_http_port().map(|p| p.port);
        for sp in svc.spec.ports.iter().filter(|p| p.app_protocol.is_http()) {
            let mut entries = Vec::new();
            for a in att.visible(svc, sp.port, client_ns) {
                match a {
                    Attached::Http(r) => entries.extend(http_entries(mesh, r, svc, sp)),
                    Attached::Grpc(r) => entries.extend(grpc_entries(mesh, r, svc, sp)),
                    Attached::Tcp(_) => {}
                }
            }
            entries.sort_by(|a, b| a.key.cmp(&b.key));
            let mut routes: Vec<Route> = entries.into_iter().map(|e| e.route).collect();
            if routes.is_empty() {
                routes.push(default_route(mesh, svc, sp));
            }
            vhosts.push(VirtualHost {
                name: names::vhost(&svc.metadata.name, &svc.metadata.namespace, sp.port),
                domains: domains(
                    svc,
                    sp.port,
                    first_http == Some(sp.port),
                    svc.metadata.namespace == client_ns,
                ),
                routes,
                ..Default::default()
            });
        }
    }
    RouteConfiguration {
        name: names::OUTBOUND_HTTP.to_string(),
        virtual_hosts: vhosts,
        ..Default::default()
    }
}

/// The inbound RouteConfiguration `inbound` for the fronted workload: one
/// virtual host per HTTP-ish port; the first takes every authority (`*`),
/// the others their `name:port` authorities.
/// The inbound virtual hosts of `svc`: (service port, workload port,
/// domains), one per distinct workload port of the HTTP-ish ports; the
/// first takes every host (`None`: domain `*`), the others their service
/// host names with the port. Authorization uses the same list to tell
/// which service port a request is for.
pub(crate) fn inbound_hosts(
    svc: &Service,
    ports: &[(&ServicePort, u32)],
) -> Vec<(u32, u32, Option<Vec<String>>)> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for (i, (sp, wport)) in ports
        .iter()
        .filter(|(sp, _)| sp.app_protocol.is_http())
        .enumerate()
    {
        if seen.contains(wport) {
            continue;
        }
        seen.push(*wport);
        let domains = (i != 0).then(|| domains(svc, sp.port, false, true));
        out.push((sp.port, *wport, domains));
    }
    out
}

/// Stat prefix of the inbound rate limit filter (and of its bucket when the
/// Service's policy gives all its HTTP ports one bucket).
pub(crate) const INBOUND_RATE_LIMIT: &str = "inbound_rate_limit";

/// The inbound RouteConfiguration of a workload of `svc` and, when a port
/// has a rate limit, the local rate limit filter for the inbound HCM.
///
/// Rate limits: when every HTTP port takes its `rateLimit` from the policy
/// on the Service as a whole, the filter holds the one bucket of this
/// instance (Envoy: listener-wide); otherwise each port with a rate limit
/// has its own bucket in its route's per-filter config and the filter holds
/// none.
pub(crate) fn inbound(
    mesh: &Mesh,
    svc: &Service,
    ports: &[(&ServicePort, u32)],
) -> (RouteConfiguration, Option<HttpFilter>) {
    let hosts = inbound_hosts(svc, ports);
    let (ns, name) = (&svc.metadata.namespace, &svc.metadata.name);
    let limits: Vec<Option<Supplied<RateLimit>>> = hosts
        .iter()
        .map(|(port, _, _)| {
            svc.port(*port)
                .and_then(|sp| mesh.port_policy(ns, name, &sp.name).rate_limit)
        })
        .collect();
    let shared = match limits.first() {
        Some(Some(first)) => {
            matches!(
                &first.by,
                Supplier::Policy {
                    target: PolicyTarget::Service { port: None, .. },
                    ..
                }
            ) && limits.iter().all(|l| l.as_ref() == Some(first))
        }
        _ => false,
    };
    let mut vhosts = Vec::new();
    for ((_, wport, domains), limit) in hosts.into_iter().zip(&limits) {
        let domains = domains.unwrap_or_else(|| vec!["*".to_string()]);
        let cluster = names::inbound_cluster(wport);
        let mut route = Route {
            name: format!("{cluster}/default"),
            r#match: Some(prefix_match("/")),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.clone())),
                timeout: Some(pb_duration(std::time::Duration::ZERO)),
                ..Default::default()
            })),
            ..Default::default()
        };
        if let (Some(l), false) = (limit, shared) {
            route.typed_per_filter_config.insert(
                resilience::LOCAL_RATE_LIMIT.to_string(),
                any(&resilience::local_rate_limit(
                    &format!("{INBOUND_RATE_LIMIT}_{wport}"),
                    Some(&l.value),
                )),
            );
        }
        vhosts.push(VirtualHost {
            name: cluster,
            domains,
            routes: vec![route],
            ..Default::default()
        });
    }
    let filter = limits.iter().any(Option::is_some).then(|| {
        let own = if shared {
            limits.first().cloned().flatten().map(|l| l.value)
        } else {
            None
        };
        resilience::http_filter(
            resilience::LOCAL_RATE_LIMIT,
            any(&resilience::local_rate_limit(
                INBOUND_RATE_LIMIT,
                own.as_ref(),
            )),
        )
    });
    (
        RouteConfiguration {
            name: names::INBOUND.to_string(),
            virtual_hosts: vhosts,
            ..Default::default()
        },
        filter,
    )
}

/// Host names of a service port: `svc`, `svc.ns`, `svc.ns.svc`,
/// `svc.ns.svc.cluster.local`, each with `:port`, and without the port too
/// for the service's first HTTP-ish port. The short `svc` form only for
/// services in the client's own namespace (as Kubernetes DNS resolves it),
/// which keeps domains unique across virtual hosts.
fn domains(svc: &Service, port: u32, portless: bool, short: bool) -> Vec<String> {
    let (n, ns) = (&svc.metadata.name, &svc.metadata.namespace);
    let mut forms = Vec::new();
    if short {
        forms.push(n.clone());
    }
    forms.push(format!("{n}.{ns}"));
    forms.push(format!("{n}.{ns}.svc"));
    forms.push(format!("{n}.{ns}.svc.cluster.local"));
    let mut out = Vec::new();
    for f in forms {
        if portless {
            out.push(f.clone());
        }
        out.push(format!("{f}:{port}"));
    }
    out
}

fn default_route(mesh: &Mesh, svc: &Service, sp: &ServicePort) -> Route {
    let target = Backend {
        cluster: names::cluster(sp.port, &svc.metadata.name, &svc.metadata.namespace),
        weight: 1,
        request: HeaderOps::default(),
        response: HeaderOps::default(),
        service: (svc.metadata.namespace.clone(), svc.metadata.name.clone()),
        port: sp.name.clone(),
    };
    let eff = mesh.caller_policy(&svc.metadata.namespace, &svc.metadata.name, &sp.name);
    let name = format!(
        "{}/default",
        names::vhost(&svc.metadata.name, &svc.metadata.namespace, sp.port)
    );
    with_per_filter(
        Route {
            name,
            r#match: Some(prefix_match("/")),
            action: Some(forward(
                mesh,
                vec![target],
                false,
                ForwardOpts::default().with_policy(&eff),
            )),
            ..Default::default()
        },
        &eff,
    )
}

/// `route` with the fault and rate limit of `eff` as per-filter configs
/// (the bucket's stat prefix is the route's name).
fn with_per_filter(mut route: Route, eff: &EffectivePolicy) -> Route {
    let stat_prefix = route.name.clone();
    if let Some(f) = &eff.fault {
        route.typed_per_filter_config.insert(
            resilience::FAULT.to_string(),
            any(&resilience::http_fault(&f.value)),
        );
    }
    if let Some(r) = &eff.rate_limit {
        route.typed_per_filter_config.insert(
            resilience::LOCAL_RATE_LIMIT.to_string(),
            any(&resilience::local_rate_limit(&stat_prefix, Some(&r.value))),
        );
    }
    route
}

fn prefix_match(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(p.to_string())),
        ..Default::default()
    }
}

/// A resolved backend of a rule.
struct Backend {
    cluster: String,
    weight: u32,
    request: HeaderOps,
    response: HeaderOps,
    service: Key,
    /// The service port's name.
    port: String,
}

#[derive(Default)]
struct ForwardOpts {
    timeout: Option<std::time::Duration>,
    prefix_rewrite: Option<String>,
    regex_rewrite: Option<(String, String)>,
    host_rewrite: Option<String>,
    mirrors: Vec<route_action::RequestMirrorPolicy>,
    retry: Option<RetryPolicy>,
    idle_timeout: Option<std::time::Duration>,
}

impl ForwardOpts {
    /// The timeouts and retries of an effective policy.
    fn with_policy(mut self, eff: &EffectivePolicy) -> Self {
        let t = eff.timeouts.as_ref().map(|t| &t.value);
        self.timeout = t.and_then(|t| t.request).map(|d| d.get());
        self.idle_timeout = t.and_then(|t| t.stream_idle).map(|d| d.get());
        self.retry = resilience::retry_policy(eff.retries.as_ref().map(|r| &r.value), t);
        self
    }
}

/// The action forwarding to `backends` (500 when every weight is 0).
fn forward(mesh: &Mesh, backends: Vec<Backend>, had_refs: bool, o: ForwardOpts) -> route::Action {
    let live: Vec<Backend> = backends.into_iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        let why = if had_refs {
            "no backend with a positive weight"
        } else {
            "no backend"
        };
        return route::Action::DirectResponse(DirectResponseAction {
            status: 500,
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString(format!(
                    "meshwork: {why}\n"
                ))),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut hash_policy = Vec::new();
    for b in &live {
        for hp in super::hash_policies(mesh, &b.service, &b.port) {
            if !hash_policy.contains(&hp) {
                hash_policy.push(hp);
            }
        }
    }
    let simple = live.len() == 1
        && live[0].request.add.is_empty()
        && live[0].request.remove.is_empty()
        && live[0].response.add.is_empty()
        && live[0].response.remove.is_empty();
    let cluster_specifier = if simple {
        route_action::ClusterSpecifier::Cluster(live[0].cluster.clone())
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: live
                .into_iter()
                .map(|b| ClusterWeight {
                    name: b.cluster,
                    weight: Some(u32v(b.weight)),
                    request_headers_to_add: b.request.add,
                    request_headers_to_remove: b.request.remove,
                    response_headers_to_add: b.response.add,
                    response_headers_to_remove: b.response.remove,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    route::Action::Route(RouteAction {
        cluster_specifier: Some(cluster_specifier),
        // Unset Gateway timeouts mean no timeout in meshwork (Envoy's own
        // default of 15 s would cut long or streaming requests).
        timeout: Some(pb_duration(o.timeout.unwrap_or(std::time::Duration::ZERO))),
        prefix_rewrite: o.prefix_rewrite.unwrap_or_default(),
        regex_rewrite: o.regex_rewrite.map(|(p, s)| RegexMatchAndSubstitute {
            pattern: Some(regex_matcher(&p)),
            substitution: s,
        }),
        host_rewrite_specifier: o
            .host_rewrite
            .map(route_action::HostRewriteSpecifier::HostRewriteLiteral),
        request_mirror_policies: o.mirrors,
        hash_policy,
        retry_policy: o.retry,
        idle_timeout: o.idle_timeout.map(pb_duration),
        ..Default::default()
    })
}

fn mirror_policy(
    mesh: &Mesh,
    route_ns: &str,
    m: &RequestMirror,
    kind: &str,
    class: PortClass,
) -> Option<route_action::RequestMirrorPolicy> {
    let (svc, sp) = backend_port(mesh, route_ns, m.backend_ref.view(), kind, class).ok()?;
    Some(route_action::RequestMirrorPolicy {
        cluster: names::cluster(
            sp.port,
            &svc.value.metadata.name,
            &svc.value.metadata.namespace,
        ),
        runtime_fraction: m.per_million().map(|n| RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: n,
                denominator: DenominatorType::Million as i32,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Resolves a backend reference to its cluster (None if it does not resolve,
/// which validation rules out).
fn backend(
    mesh: &Mesh,
    route_ns: &str,
    v: BackendView<'_>,
    kind: &str,
    class: PortClass,
    filters: &[&HeaderModifierPair<'_>],
) -> Option<Backend> {
    let (svc, sp) = backend_port(mesh, route_ns, v, kind, class).ok()?;
    let mut request = HeaderOps::default();
    let mut response = HeaderOps::default();
    for f in filters {
        if let Some(h) = f.request {
            request.extend(h);
        }
        if let Some(h) = f.response {
            response.extend(h);
        }
    }
    Some(Backend {
        cluster: names::cluster(
            sp.port,
            &svc.value.metadata.name,
            &svc.value.metadata.namespace,
        ),
        weight: v.weight,
        request,
        response,
        service: (
            svc.value.metadata.namespace.clone(),
            svc.value.metadata.name.clone(),
        ),
        port: sp.name.clone(),
    })
}

/// The header modifiers of one filter.
struct HeaderModifierPair<'a> {
    request: Option<&'a HeaderModifier>,
    response: Option<&'a HeaderModifier>,
}

fn http_filter_headers(f: &HttpRouteFilter) -> HeaderModifierPair<'_> {
    HeaderModifierPair {
        request: f
            .request_header_modifier
            .as_ref()
            .filter(|_| f.kind == HttpFilterType::RequestHeaderModifier),
        response: f
            .response_header_modifier
            .as_ref()
            .filter(|_| f.kind == HttpFilterType::ResponseHeaderModifier),
    }
}

/// Path prefix of a `PathPrefix` match as Gateway defines it: a trailing `/`
/// is not significant, and `/` alone means everything (`""` here).
fn normalized_prefix(v: &str) -> &str {
    v.trim_end_matches('/')
}

fn http_path(m: &HttpRouteMatch) -> (route_match::PathSpecifier, i64, i64) {
    let v = &m.path.value;
    match m.path.kind {
        PathMatchType::Exact => (route_match::PathSpecifier::Path(v.clone()), 0, len(v)),
        PathMatchType::RegularExpression => (
            route_match::PathSpecifier::SafeRegex(regex_matcher(v)),
            1,
            len(v),
        ),
        PathMatchType::PathPrefix => {
            let p = normalized_prefix(v);
            if p.is_empty() {
                (route_match::PathSpecifier::Prefix("/".to_string()), 2, 1)
            } else {
                (
                    route_match::PathSpecifier::PathSeparatedPrefix(p.to_string()),
                    2,
                    len(p),
                )
            }
        }
    }
}

fn len(s: &str) -> i64 {
    i64::try_from(s.len()).unwrap_or(i64::MAX)
}

/// Header matchers; names are case-insensitive and, per Gateway API, only the
/// first of equivalent names counts.
fn header_matchers(hs: &[HeaderMatch]) -> Vec<HeaderMatcher> {
    let mut seen: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for h in hs {
        let name = h.name.to_ascii_lowercase();
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        let sm = match h.kind {
            MatchType::Exact => exact(&h.value),
            MatchType::RegularExpression => regex_string(&h.value),
        };
        out.push(HeaderMatcher {
            name,
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)),
            ..Default::default()
        });
    }
    out
}

fn http_entries(
    mesh: &Mesh,
    r: &Sourced<HttpRoute>,
    parent: &Service,
    psp: &ServicePort,
) -> Vec<Entry> {
    let route = &r.value;
    let ns = route.metadata.namespace.as_str();
    let age = route_age_key(&route.metadata);
    let mut out = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let mut req = HeaderOps::default();
        let mut resp = HeaderOps::default();
        let mut redirect: Option<&RequestRedirect> = None;
        let mut rewrite = None;
        let mut mirrors = Vec::new();
        for f in &rule.filters {
            let hm = http_filter_headers(f);
            if let Some(h) = hm.request {
                req.extend(h);
            }
            if let Some(h) = hm.response {
                resp.extend(h);
            }
            match f.kind {
                HttpFilterType::RequestRedirect => redirect = f.request_redirect.as_ref(),
                HttpFilterType::UrlRewrite => rewrite = f.url_rewrite.as_ref(),
                HttpFilterType::RequestMirror => {
                    if let Some(m) = f
                        .request_mirror
                        .as_ref()
                        .and_then(|m| mirror_policy(mesh, ns, m, "HTTPRoute", PortClass::Http))
                    {
                        mirrors.push(m);
                    }
                }
                _ => {}
            }
        }
        let backends: Vec<Backend> = if rule.backend_refs.is_empty() {
            vec![parent_backend(parent, psp)]
        } else {
            rule.backend_refs
                .iter()
                .filter_map(|b| {
                    let hms: Vec<_> = b.filters.iter().map(http_filter_headers).collect();
                    let refs: Vec<&HeaderModifierPair<'_>> = hms.iter().collect();
                    backend(mesh, ns, b.view(), "HTTPRoute", PortClass::Http, &refs)
                })
                .collect()
        };
        let parent_key: Key = (
            parent.metadata.namespace.clone(),
            parent.metadata.name.clone(),
        );
        let eff = mesh.route_policy(route, i, &parent_key, &psp.name);
        for (j, m) in rule.matches.iter().enumerate() {
            let (path, rank, plen) = http_path(m);
            let mut headers = Vec::new();
            if let Some(meth) = m.method {
                headers.push(HeaderMatcher {
                    name: ":method".to_string(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::StringMatch(exact(meth.as_str())),
                    ),
                    ..Default::default()
                });
            }
            let hm = header_matchers(&m.headers);
            let n_headers = len_i64(hm.len());
            headers.extend(hm);
            let query: Vec<QueryParameterMatcher> = query_matchers(&m.query_params);
            let prefix = (m.path.kind == PathMatchType::PathPrefix)
                .then(|| normalized_prefix(&m.path.value));
            let action = match redirect {
                Some(rd) => route::Action::Redirect(redirect_action(rd, prefix, psp.port)),
                None => {
                    let mut o = ForwardOpts {
                        mirrors: mirrors.clone(),
                        ..Default::default()
                    }
                    .with_policy(&eff);
                    if let Some(rw) = rewrite {
                        o.host_rewrite = rw.hostname.clone();
                        if let Some(pm) = &rw.path {
                            apply_path_rewrite(&mut o, pm, prefix);
                        }
                    }
                    forward(
                        mesh,
                        clone_backends(&backends),
                        !rule.backend_refs.is_empty(),
                        o,
                    )
                }
            };
            let name = if rule.matches.len() > 1 {
                format!("{ns}/{}/{i}/{j}", route.metadata.name)
            } else {
                format!("{ns}/{}/{i}", route.metadata.name)
            };
            out.push(Entry {
                key: SortKey {
                    specificity: vec![
                        rank,
                        -plen,
                        i64::from(m.method.is_none()),
                        -n_headers,
                        -len_i64(query.len()),
                    ],
                    age: age.clone(),
                    rule: i,
                    m: j,
                },
                route: with_per_filter(
                    Route {
                        name,
                        r#match: Some(RouteMatch {
                            path_specifier: Some(path),
                            headers,
                            query_parameters: query,
                            ..Default::default()
                        }),
                        action: Some(action),
                        request_headers_to_add: req.add.clone(),
                        request_headers_to_remove: req.remove.clone(),
                        response_headers_to_add: resp.add.clone(),
                        response_headers_to_remove: resp.remove.clone(),
                        ..Default::default()
                    },
                    &eff,
                ),
            });
        }
    }
    out
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn query_matchers(qs: &[HeaderMatch]) -> Vec<QueryParameterMatcher> {
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for q in qs {
        if seen.contains(&q.name.as_str()) {
            continue;
        }
        seen.push(&q.name);
        let sm = match q.kind {
            MatchType::Exact => exact(&q.value),
            MatchType::RegularExpression => regex_string(&q.value),
        };
        out.push(QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm),
            ),
        });
    }
    out
}

fn clone_backends(bs: &[Backend]) -> Vec<Backend> {
    bs.iter()
        .map(|b| Backend {
            cluster: b.cluster.clone(),
            weight: b.weight,
            request: HeaderOps {
                add: b.request.add.clone(),
                remove: b.request.remove.clone(),
            },
            response: HeaderOps {
                add: b.response.add.clone(),
                remove: b.response.remove.clone(),
            },
            service: b.service.clone(),
            port: b.port.clone(),
        })
        .collect()
}

fn parent_backend(svc: &Service, sp: &ServicePort) -> Backend {
    Backend {
        cluster: names::cluster(sp.port, &svc.metadata.name, &svc.metadata.namespace),
        weight: 1,
        request: HeaderOps::default(),
        response: HeaderOps::default(),
        service: (svc.metadata.namespace.clone(), svc.metadata.name.clone()),
        port: sp.name.clone(),
    }
}

/// URLRewrite path. `prefix` is the rule's normalized PathPrefix (validation
/// guarantees there is exactly one when ReplacePrefixMatch is used).
fn apply_path_rewrite(o: &mut ForwardOpts, pm: &PathModifier, prefix: Option<&str>) {
    match pm.kind {
        PathModifierType::ReplaceFullPath => {
            let v = pm
                .replace_full_path
                .clone()
                .unwrap_or_else(|| "/".to_string());
            o.regex_rewrite = Some(("^/.*$".to_string(), escape_substitution(&v)));
        }
        PathModifierType::ReplacePrefixMatch => {
            let r = pm
                .replace_prefix_match
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/');
            let p = prefix.unwrap_or("");
            if p.is_empty() {
                // Matched by `prefix: "/"`: `/bar` -> `<r>/bar`.
                o.prefix_rewrite = Some(format!("{r}/"));
            } else if r.is_empty() {
                // `/foo` replaced by `/`: prefix_rewrite would turn `/foo/bar`
                // into `//bar`; swallow the separator with a regex instead.
                o.regex_rewrite = Some((format!("^{}/*", regex::escape(p)), "/".to_string()));
            } else {
                o.prefix_rewrite = Some(r.to_string());
            }
        }
    }
}

/// RE2 rewrite strings treat `\` as an escape (for `\1`); paths never need one.
fn escape_substitution(s: &str) -> String {
    s.replace('\\', "\\\\")
}

fn redirect_action(
    rd: &RequestRedirect,
    prefix: Option<&str>,
    service_port: u32,
) -> RedirectAction {
    let code = match rd.status_code {
        301 => redirect_action::RedirectResponseCode::MovedPermanently,
        303 => redirect_action::RedirectResponseCode::SeeOther,
        307 => redirect_action::RedirectResponseCode::TemporaryRedirect,
        308 => redirect_action::RedirectResponseCode::PermanentRedirect,
        _ => redirect_action::RedirectResponseCode::Found,
    };
    // Gateway API: without a port, a scheme implies its well-known port; with
    // neither, the port the request came to (here: the service port). Envoy
    // keeps the request's port on a scheme change and drops it when the host
    // changes, so both cases are spelled out (80 needs no spelling out).
    let port = rd.port.unwrap_or(match rd.scheme {
        Some(crate::resources::Scheme::Http) => 80,
        Some(crate::resources::Scheme::Https) => 443,
        None if service_port == 80 => 0,
        None => service_port,
    });
    let path = rd.path.as_ref().map(|pm| match pm.kind {
        PathModifierType::ReplaceFullPath => redirect_action::PathRewriteSpecifier::PathRedirect(
            pm.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        ),
        PathModifierType::ReplacePrefixMatch => {
            let r = pm
                .replace_prefix_match
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/');
            let p = prefix.unwrap_or("");
            let rewrite = if p.is_empty() {
                format!("{r}/")
            } else {
                r.to_string()
            };
            redirect_action::PathRewriteSpecifier::PrefixRewrite(rewrite)
        }
    });
    RedirectAction {
        host_redirect: rd.hostname.clone().unwrap_or_default(),
        port_redirect: port,
        response_code: code as i32,
        scheme_rewrite_specifier: rd.scheme.map(|s| {
            redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s.as_str().to_string())
        }),
        path_rewrite_specifier: path,
        ..Default::default()
    }
}

fn grpc_entries(
    mesh: &Mesh,
    r: &Sourced<GrpcRoute>,
    parent: &Service,
    psp: &ServicePort,
) -> Vec<Entry> {
    let route = &r.value;
    let ns = route.metadata.namespace.as_str();
    let age = route_age_key(&route.metadata);
    let eff = mesh.caller_policy(&parent.metadata.namespace, &parent.metadata.name, &psp.name);
    let mut out = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let mut req = HeaderOps::default();
        let mut resp = HeaderOps::default();
        let mut mirrors = Vec::new();
        for f in &rule.filters {
            match f.kind {
                GrpcFilterType::RequestHeaderModifier => {
                    if let Some(h) = &f.request_header_modifier {
                        req.extend(h);
                    }
                }
                GrpcFilterType::ResponseHeaderModifier => {
                    if let Some(h) = &f.response_header_modifier {
                        resp.extend(h);
                    }
                }
                GrpcFilterType::RequestMirror => {
                    if let Some(m) = f
                        .request_mirror
                        .as_ref()
                        .and_then(|m| mirror_policy(mesh, ns, m, "GRPCRoute", PortClass::Grpc))
                    {
                        mirrors.push(m);
                    }
                }
                GrpcFilterType::ExtensionRef => {}
            }
        }
        let backends: Vec<Backend> =
            if rule.backend_refs.is_empty() {
                vec![parent_backend(parent, psp)]
            } else {
                rule.backend_refs
                    .iter()
                    .filter_map(|b| {
                        let hms: Vec<HeaderModifierPair<'_>> =
                            b.filters
                                .iter()
                                .map(|f| HeaderModifierPair {
                                    request: f.request_header_modifier.as_ref().filter(|_| {
                                        f.kind == GrpcFilterType::RequestHeaderModifier
                                    }),
                                    response: f.response_header_modifier.as_ref().filter(|_| {
                                        f.kind == GrpcFilterType::ResponseHeaderModifier
                                    }),
                                })
                                .collect();
                        let refs: Vec<&HeaderModifierPair<'_>> = hms.iter().collect();
                        backend(mesh, ns, b.view(), "GRPCRoute", PortClass::Grpc, &refs)
                    })
                    .collect()
            };
        let matches: Vec<Option<&crate::resources::GrpcRouteMatch>> = if rule.matches.is_empty() {
            vec![None]
        } else {
            rule.matches.iter().map(Some).collect()
        };
        for (j, m) in matches.iter().enumerate() {
            let (path, svc_len, meth_len) = grpc_path(m.and_then(|m| m.method.as_ref()));
            let headers = m.map(|m| header_matchers(&m.headers)).unwrap_or_default();
            let n_headers = len_i64(headers.len());
            let action = forward(
                mesh,
                clone_backends(&backends),
                !rule.backend_refs.is_empty(),
                ForwardOpts {
                    mirrors: mirrors.clone(),
                    ..Default::default()
                }
                .with_policy(&eff),
            );
            let name = if matches.len() > 1 {
                format!("{ns}/{}/{i}/{j}", route.metadata.name)
            } else {
                format!("{ns}/{}/{i}", route.metadata.name)
            };
            out.push(Entry {
                key: SortKey {
                    specificity: vec![-svc_len, -meth_len, -n_headers],
                    age: age.clone(),
                    rule: i,
                    m: j,
                },
                route: with_per_filter(
                    Route {
                        name,
                        r#match: Some(RouteMatch {
                            path_specifier: Some(path),
                            headers,
                            ..Default::default()
                        }),
                        action: Some(action),
                        request_headers_to_add: req.add.clone(),
                        request_headers_to_remove: req.remove.clone(),
                        response_headers_to_add: resp.add.clone(),
                        response_headers_to_remove: resp.remove.clone(),
                        ..Default::default()
                    },
                    &eff,
                ),
            });
        }
    }
    out
}

/// gRPC method match as a path match: exact `/svc/method`, prefix `/svc/`,
/// or a full-match regex. Returns (path, service chars, method chars).
fn grpc_path(
    m: Option<&crate::resources::GrpcMethodMatch>,
) -> (route_match::PathSpecifier, i64, i64) {
    let Some(m) = m else {
        return (route_match::PathSpecifier::Prefix("/".to_string()), 0, 0);
    };
    let svc = m
        .service
        .as_deref()
        .map(|s| s.strip_prefix('.').unwrap_or(s));
    let meth = m.method.as_deref();
    let (sl, ml) = (svc.map(len).unwrap_or(0), meth.map(len).unwrap_or(0));
    let spec = match (m.kind, svc, meth) {
        (MatchType::Exact, Some(s), Some(me)) => {
            route_match::PathSpecifier::Path(format!("/{s}/{me}"))
        }
        (MatchType::Exact, Some(s), None) => route_match::PathSpecifier::Prefix(format!("/{s}/")),
        (MatchType::Exact, None, Some(me)) => route_match::PathSpecifier::SafeRegex(regex_matcher(
            &format!("/[^/]+/{}", regex::escape(me)),
        )),
        (MatchType::RegularExpression, s, me) => {
            let s = s
                .map(|s| format!("(?:{s})"))
                .unwrap_or_else(|| "[^/]+".to_string());
            let me = me
                .map(|m| format!("(?:{m})"))
                .unwrap_or_else(|| "[^/]+".to_string());
            route_match::PathSpecifier::SafeRegex(regex_matcher(&format!("/{s}/{me}")))
        }
        (MatchType::Exact, None, None) => route_match::PathSpecifier::Prefix("/".to_string()),
    };
    (spec, sl, ml)
}
