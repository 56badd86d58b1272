//! The engine on RBAC made by the real translator from YAML, with the peer
//! identity set directly (no mTLS on the data path yet): principals,
//! namespaces, their negations and wildcards, plaintext, ports, TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::config::model::Listener;

const SVC: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports:\n  - {name: http, port: 80}\n  - {name: admin, port: 8080}\n---\napiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec:\n  ports: [{name: pg, port: 5432, appProtocol: tcp}]\n---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {name: api-0}\nspec: {service: api, address: 127.0.0.1}\n---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {name: db-0}\nspec: {service: db, address: 127.0.0.1}\n";

/// The inbound listener of `workload`'s sidecar for `SVC` plus `extra`.
fn inbound(extra: &str, workload: &str) -> Listener {
    let yaml = format!("{SVC}---\n{extra}");
    let mesh = api::validate(api::load_str("t.yaml", &yaml).unwrap()).unwrap();
    let ctx = api::ProxyContext {
        workload: Some(("default".into(), workload.into())),
        ..Default::default()
    };
    let x = api::translate(&mesh, &ctx);
    let snap =
        crate::config::xds::from_resources("1", x.listeners, x.routes, x.clusters, x.endpoints)
            .unwrap();
    (*snap.listeners["inbound"]).clone()
}

fn http_authz(extra: &str) -> Authz {
    let l = inbound(extra, "api-0");
    (**l.http.unwrap().authz.as_ref().expect("HTTP RBAC filters")).clone()
}

fn policy(action: &str, rules: &str) -> String {
    format!("apiVersion: meshwork.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{}}}\nspec:\n  targetRef: {{kind: Service, name: api}}\n  action: {action}\n  rules:\n{rules}", action.to_ascii_lowercase())
}

fn ask(a: &Authz, id: Option<&str>, method: &str, path: &str, authority: &str) -> Decision {
    ask_h(a, id, method, path, authority, &HeaderMap::new())
}

fn ask_h(
    a: &Authz,
    id: Option<&str>,
    method: &str,
    path: &str,
    authority: &str,
    headers: &HeaderMap,
) -> Decision {
    let m = Method::from_bytes(method.as_bytes()).unwrap();
    a.evaluate(&Input {
        peer_identity: id,
        http: Some(HttpInput {
            method: &m,
            path: path.split('?').next().unwrap(),
            path_and_query: path,
            authority,
            headers,
        }),
    })
}

const FRONT: &str = "spiffe://cluster.local/ns/web/sa/frontend";
const BATCH: &str = "spiffe://cluster.local/ns/jobs/sa/batch";

#[test]
fn principals_exact_prefix_suffix_and_plaintext() {
    let a = http_authz(&policy(
        "ALLOW",
        "  - from: [{principals: [\"spiffe://cluster.local/ns/web/sa/frontend\"]}]\n  - from: [{principals: [\"spiffe://cluster.local/ns/jobs/*\"]}]\n    to: [{methods: [POST]}]\n  - from: [{principals: [\"*/sa/admin\"]}]\n",
    ));
    let d = ask(&a, Some(FRONT), "GET", "/", "api");
    assert!(d.allowed);
    assert_eq!(d.policy.as_deref(), Some("default/p-allow/rules[0]"));
    assert!(ask(&a, Some(BATCH), "POST", "/", "api").allowed);
    assert!(!ask(&a, Some(BATCH), "GET", "/", "api").allowed);
    let d = ask(
        &a,
        Some("spiffe://other.td/ns/x/sa/admin"),
        "GET",
        "/",
        "api",
    );
    assert_eq!(d.policy.as_deref(), Some("default/p-allow/rules[2]"));
    // Plaintext: no identity, principal rules never match.
    let d = ask(&a, None, "GET", "/", "api");
    assert!(!d.allowed && d.policy.is_none() && !d.default_deny, "{d:?}");
}

#[test]
fn namespaces_and_negations() {
    let a = http_authz(&policy(
        "DENY",
        "  - from: [{namespaces: [jobs]}]\n  - from: [{notNamespaces: [\"web\", \"jobs\"]}]\n    to: [{paths: [\"/internal*\"]}]\n  - from: [{notPrincipals: [\"*\"]}]\n    to: [{paths: [\"/private\"]}]\n",
    ));
    let d = ask(&a, Some(BATCH), "GET", "/", "api");
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("default/p-deny/rules[0]"));
    assert!(ask(&a, Some(FRONT), "GET", "/internal/x", "api").allowed);
    let other = "spiffe://cluster.local/ns/other/sa/x";
    assert!(!ask(&a, Some(other), "GET", "/internal/x", "api").allowed);
    // notPrincipals ["*"]: matches a peer without identity (as Envoy does
    // for plaintext), not an authenticated one.
    assert!(!ask(&a, None, "GET", "/private", "api").allowed);
    assert!(ask(&a, Some(FRONT), "GET", "/private", "api").allowed);
    // A namespace rule does not match a same-named service account elsewhere.
    assert!(
        ask(
            &a,
            Some("spiffe://cluster.local/ns/web/sa/jobs"),
            "GET",
            "/",
            "api"
        )
        .allowed
    );
}

#[test]
fn namespace_wildcards() {
    let a = http_authz(&policy(
        "ALLOW",
        "  - from: [{namespaces: [\"team-*\"]}]\n  - from: [{namespaces: [\"*-prod\"]}]\n",
    ));
    assert!(
        ask(
            &a,
            Some("spiffe://cluster.local/ns/team-a/sa/x"),
            "GET",
            "/",
            "api"
        )
        .allowed
    );
    assert!(ask(&a, Some("spiffe://td/ns/eu-prod/sa/x"), "GET", "/", "api").allowed);
    assert!(!ask(&a, Some("spiffe://td/ns/prod/sa/x"), "GET", "/", "api").allowed);
}

#[test]
fn audit_records_without_changing_the_outcome() {
    let a = http_authz(
        &(policy("AUDIT", "  - from: [{namespaces: [jobs]}]\n")
            + "---\n"
            + &policy("DENY", "  - to: [{paths: [\"/admin*\"]}]\n")),
    );
    let d = ask(&a, Some(BATCH), "GET", "/", "api");
    assert!(d.allowed);
    assert_eq!(d.audit, vec!["default/p-audit/rules[0]".to_string()]);
    // Audits run first: even a denied request is audited.
    let d = ask(&a, Some(BATCH), "GET", "/admin/x", "api");
    assert!(!d.allowed);
    assert_eq!(d.audit.len(), 1);
}

#[test]
fn ports_on_a_service_with_two_http_ports_follow_the_virtual_host() {
    let a = http_authz(&policy("ALLOW", "  - to: [{ports: [8080]}]\n"));
    assert!(ask(&a, None, "GET", "/", "api.default:8080").allowed);
    assert!(ask(&a, None, "GET", "/", "API.default.svc:8080").allowed);
    assert!(!ask(&a, None, "GET", "/", "api").allowed);
    assert!(!ask(&a, None, "GET", "/", "api.default:80").allowed);
    let a = http_authz(&policy("ALLOW", "  - to: [{ports: [80]}]\n"));
    assert!(ask(&a, None, "GET", "/", "api").allowed);
    assert!(!ask(&a, None, "GET", "/", "api.default:8080").allowed);
}

#[test]
fn headers_methods_paths() {
    let a = http_authz(&policy(
        "ALLOW",
        "  - to: [{methods: [GET], paths: [\"/a\", \"/b/*\", \"*.png\"], notPaths: [\"/b/secret\"], headers: {x-user: \"al*\", x-env: \"*\"}}]\n",
    ));
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("alice"));
    h.insert("x-env", HeaderValue::from_static("prod"));
    for (m, p, ok) in [
        ("GET", "/a", true),
        ("GET", "/a?q=1", true),
        ("GET", "/b/c", true),
        ("GET", "/img/x.png", true),
        ("GET", "/b/secret", false),
        ("POST", "/a", false),
        ("GET", "/c", false),
    ] {
        assert_eq!(ask_h(&a, None, m, p, "api", &h).allowed, ok, "{m} {p}");
    }
    let mut no_env = h.clone();
    no_env.remove("x-env");
    assert!(!ask_h(&a, None, "GET", "/a", "api", &no_env).allowed);
}

#[test]
fn default_deny_and_allow_without_rules() {
    let mesh = "apiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {authorization: {defaultAction: deny}}\n";
    let d = ask(&http_authz(mesh), Some(FRONT), "GET", "/", "api");
    assert!(!d.allowed && d.default_deny, "{d:?}");
    let none = "apiVersion: meshwork.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: nothing}\nspec: {targetRef: {kind: Service, name: api}, action: ALLOW}\n";
    let d = ask(&http_authz(none), Some(FRONT), "GET", "/", "api");
    assert!(!d.allowed, "{d:?}");
}

#[test]
fn tcp_chains_see_identity_and_port_only() {
    let p = "apiVersion: meshwork.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: db}\nspec:\n  targetRef: {kind: Service, name: db}\n  action: ALLOW\n  rules:\n  - from: [{principals: [\"spiffe://cluster.local/ns/jobs/sa/batch\"]}]\n    to: [{ports: [5432]}]\n";
    let l = inbound(p, "db-0");
    let a = l.tcp.unwrap().authz.clone().unwrap();
    let tcp = |id| {
        a.evaluate(&Input {
            peer_identity: id,
            http: None,
        })
    };
    assert!(tcp(Some(BATCH)).allowed);
    assert!(!tcp(Some(FRONT)).allowed);
    assert!(!tcp(None).allowed);
    // On a mixed service's TCP chain an ALLOW rule with HTTP fields cannot
    // match, while a DENY rule drops them and denies more (fail closed).
    let l = inbound(
        &(policy("ALLOW", "  - to: [{methods: [GET]}]\n")
            + "---\n"
            + &policy(
                "DENY",
                "  - from: [{namespaces: [jobs]}]\n    to: [{paths: [\"/x\"]}]\n",
            )),
        "api-0",
    );
    let a = l.tcp.unwrap().authz.clone().unwrap();
    let d = a.evaluate(&Input {
        peer_identity: Some(BATCH),
        http: None,
    });
    assert_eq!(d.policy.as_deref(), Some("default/p-deny/rules[0]"));
    let d = a.evaluate(&Input {
        peer_identity: Some(FRONT),
        http: None,
    });
    assert!(!d.allowed && d.policy.is_none());
}
