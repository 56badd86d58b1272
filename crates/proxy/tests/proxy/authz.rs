//! Authorization matrix through real sockets: a standalone proxy fronting a
//! workload (its `inbound` listener) with AuthorizationPolicies, real HTTP,
//! gRPC (grpcio and raw h2) and TCP clients. Covers allow by method/path,
//! deny by path, header rules, gRPC service/method, DENY over ALLOW, default
//! deny, ALLOW without rules, audit (logged and counted, never enforced),
//! TCP denial by port (connection closed), the metric and the access log
//! flag.
//!
//! Identity-based rules (principals, namespaces) need a peer identity, which
//! only mTLS provides: those rows are in `mtls.rs` (two sidecars with SVIDs),
//! and the engine's unit tests set identities directly. Here every client is
//! plaintext (no identity).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use testkit::{Backend, H1Client, H2Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;
use crate::protocols::{run_peer_client, PeerServer};

const HEAD: &str = "apiVersion: meshwork.dev/v1alpha1";

fn policy(name: &str, target: &str, action: &str, rules: &str) -> String {
    format!(
        "{HEAD}\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{kind: Service, name: {target}}}\n  action: {action}\n{rules}---\n"
    )
}

fn default_deny() -> String {
    format!("{HEAD}\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{authorization: {{defaultAction: deny}}}}\n---\n")
}

async fn send(h: &Harness, method: &str, path: &str, headers: &[(&str, &str)]) -> testkit::Reply {
    let mut c = H1Client::connect(h.inbound()).await.unwrap();
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    c.send(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

fn assert_denied(r: &testkit::Reply, what: &str) {
    assert_eq!(r.status, 403, "{what}: {}", r.text());
    assert_eq!(r.header("x-meshwork-error"), Some("rbac_denied"), "{what}");
    assert_eq!(r.text(), "RBAC: access denied", "{what}");
}

#[tokio::test]
async fn http_matrix_allow_deny_headers_audit_metrics_and_access_log() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app])
        + &policy(
            "readers",
            "web",
            "ALLOW",
            "  rules:\n  - to: [{methods: [GET, HEAD], paths: [\"/public/*\", \"/health\"]}]\n  - to: [{paths: [\"/team/*\"], headers: {x-user: \"al*\"}}]\n",
        )
        + &policy(
            "no-secrets",
            "web",
            "DENY",
            "  rules:\n  - to: [{paths: [\"*/secret\"]}]\n",
        )
        + &policy(
            "would-block",
            "web",
            "AUDIT",
            "  rules:\n  - to: [{paths: [\"/public/audited\"]}]\n",
        );
    let h = Harness::start_with(&yaml, Some("web-0")).await;

    // Allowed by method and path.
    for (m, p) in [
        ("GET", "/public/a"),
        ("HEAD", "/public/b"),
        ("GET", "/health"),
    ] {
        let r = send(&h, m, p, &[]).await;
        assert_eq!(r.status, 200, "{m} {p}: {}", r.text());
        if m == "GET" {
            assert_eq!(r.backend(), Some("web-app"));
        }
    }
    // No ALLOW rule matches: wrong method, unknown path.
    assert_denied(&send(&h, "POST", "/public/a", &[]).await, "POST");
    assert_denied(&send(&h, "GET", "/private", &[]).await, "unknown path");
    // DENY beats ALLOW.
    assert_denied(&send(&h, "GET", "/public/secret", &[]).await, "deny");
    // Header rule.
    let r = send(&h, "GET", "/team/x", &[("x-user", "alice")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_denied(
        &send(&h, "GET", "/team/x", &[("x-user", "bob")]).await,
        "header",
    );
    assert_denied(&send(&h, "GET", "/team/x", &[]).await, "no header");
    // Audit: allowed, but counted as "would deny".
    let r = send(&h, "GET", "/public/audited", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The application never saw a denied request.
    let paths: Vec<String> = app.seen().into_iter().map(|s| s.path).collect();
    assert!(
        paths
            .iter()
            .all(|p| !p.contains("secret") && p != "/private"),
        "{paths:?}"
    );

    let m = |decision: &'static str, policy: &'static str| {
        let h = &h;
        async move {
            h.metric(
                "meshwork_authz_decisions_total",
                &[
                    ("direction", "inbound"),
                    ("destination_service", "web.default"),
                    ("decision", decision),
                    ("policy", policy),
                ],
            )
            .await
        }
    };
    assert_eq!(m("deny", "default/no-secrets/rules[0]").await, 1.0);
    assert_eq!(m("deny", "").await, 4.0, "no ALLOW rule matched");
    assert_eq!(m("allow", "default/readers/rules[0]").await, 4.0);
    assert_eq!(m("allow", "default/readers/rules[1]").await, 1.0);
    assert_eq!(m("audit_deny", "default/would-block/rules[0]").await, 1.0);
    let local = h
        .metric(
            "meshwork_responses_total",
            &[("reason", "rbac_denied"), ("code", "403")],
        )
        .await;
    assert_eq!(local, 5.0);

    let log = h.access_log().await;
    let denied: Vec<_> = log
        .iter()
        .filter(|e| e["response_flags"] == "RBAC")
        .collect();
    assert_eq!(denied.len(), 5, "{log:?}");
    let secret = denied
        .iter()
        .find(|e| e["path"] == "/public/secret")
        .expect("logged");
    assert_eq!(secret["status"], 403);
    assert_eq!(
        secret["reason"],
        "denied by DENY policy default/no-secrets/rules[0]"
    );
}

#[tokio::test]
async fn default_deny_and_allow_without_rules_deny_everything() {
    let app = Backend::http("web-app").await;
    let h = Harness::start_with(
        &(http_service("web", &[&app]) + &default_deny()),
        Some("web-0"),
    )
    .await;
    assert_denied(&send(&h, "GET", "/", &[]).await, "default deny");
    // An ALLOW policy opens what it names, default deny or not.
    h.rewrite(
        &(http_service("web", &[&app])
            + &default_deny()
            + &policy(
                "ok",
                "web",
                "ALLOW",
                "  rules:\n  - to: [{paths: [\"/ok\"]}]\n",
            )),
    )
    .await
    .unwrap();
    assert_eq!(send(&h, "GET", "/ok", &[]).await.status, 200);
    assert_denied(&send(&h, "GET", "/", &[]).await, "default deny, other path");
    // Without a Mesh (default allow), an ALLOW policy with no rules still
    // matches nothing, so everything is denied.
    h.rewrite(&(http_service("web", &[&app]) + &policy("nothing", "web", "ALLOW", "")))
        .await
        .unwrap();
    assert_denied(&send(&h, "GET", "/ok", &[]).await, "ALLOW without rules");
    // No policy at all: allowed.
    h.rewrite(&http_service("web", &[&app])).await.unwrap();
    assert_eq!(send(&h, "GET", "/ok", &[]).await.status, 200);
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_service_and_method_rules() {
    let server = PeerServer::start("health_peer.py").await;
    let yaml = service("health", 50051, "grpc")
        + &workload("health-0", "health", 50051, server.addr())
        + &policy(
            "checks-only",
            "health",
            "ALLOW",
            "  rules:\n  - to: [{grpc: {service: grpc.health.v1.Health, method: Check}}]\n",
        );
    let h = Harness::start_with(&yaml, Some("health-0")).await;

    // grpcio through the inbound listener: Check passes, Watch is refused
    // with PERMISSION_DENIED.
    let seen = run_peer_client(
        "health_peer.py",
        &[h.inbound().to_string(), "health".into()],
    )
    .await;
    assert_eq!(seen["check:"], "SERVING", "{seen}");
    assert_eq!(seen["watch_error"], "PERMISSION_DENIED", "{seen}");

    // On the wire: a trailers-only response with grpc-status 7.
    let mut c = H2Client::connect(h.inbound()).await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri("http://health/grpc.health.v1.Health/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("7"), "{:?}", r.headers);
    assert_eq!(r.header("x-meshwork-error"), Some("rbac_denied"));
    let n = h
        .metric(
            "meshwork_requests_total",
            &[("direction", "inbound"), ("grpc_status", "7")],
        )
        .await;
    assert_eq!(n, 2.0, "grpcio's Watch and ours");
}

#[tokio::test]
async fn tcp_denied_by_port_is_closed_right_after_accept() {
    let db = Backend::tcp_echo("db").await;
    let yaml = tcp_service("db", 5432, 0)
        + &workload("db-0", "db", 5432, db.addr)
        + &policy(
            "no-pg",
            "db",
            "DENY",
            "  rules:\n  - to: [{ports: [5432]}]\n",
        );
    let h = Harness::start_with(&yaml, Some("db-0")).await;
    let mut s = TcpStream::connect(h.inbound()).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection is closed without a byte");
    assert_eq!(db.connections(), 0, "the application saw nothing");
    let n = h
        .metric(
            "meshwork_authz_decisions_total",
            &[
                ("destination_service", "db.default"),
                ("decision", "deny"),
                ("policy", "default/no-pg/rules[0]"),
            ],
        )
        .await;
    assert_eq!(n, 1.0);
    let log = h.access_log().await;
    assert!(
        log.iter()
            .any(|e| e["protocol"] == "TCP" && e["response_flags"] == "RBAC"),
        "{log:?}"
    );

    // A rule on another port of the service does not apply: connections pass.
    h.rewrite(
        &(tcp_service("db", 5432, 0)
            + &workload("db-0", "db", 5432, db.addr)
            + &policy(
                "plain",
                "db",
                "ALLOW",
                "  rules:\n  - to: [{ports: [5432]}]\n",
            )),
    )
    .await
    .unwrap();
    let mut s = TcpStream::connect(h.inbound()).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
}
