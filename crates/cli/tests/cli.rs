//! The `meshwork` binary end to end: `validate` errors, SIGTERM drain, and
//! interop: the same YAML, translated, runs in a real Envoy and routes the
//! same way as in meshwork's proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::{Backend, H1Client};

#[path = "cli/capture.rs"]
mod capture;
#[path = "cli/demo_transparent.rs"]
mod demo_transparent;
#[path = "cli/hosts.rs"]
mod hosts;
#[path = "cli/mesh_hosts.rs"]
mod mesh_hosts;
#[path = "cli/run.rs"]
mod run;

const BIN: &str = env!("CARGO_BIN_EXE_meshwork");

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshwork-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn meshwork(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kills the child when the test ends, pass or fail.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mesh_yaml(backends: &[(&str, SocketAddr)]) -> String {
    let mut y = String::new();
    for (name, addr) in backends {
        y += &format!(
            "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: http, port: 80, appProtocol: http}}]\n---\n\
             apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-0}}\nspec: {{service: {name}, address: \"{}\", ports: {{http: {}}}}}\n---\n",
            addr.ip(),
            addr.port()
        );
    }
    y
}

/// Bound on waits in these tests: against hanging, not a timing assertion
/// (the whole suite runs its root-only multi-host tests alongside).
const PATIENCE: Duration = Duration::from_secs(30);

async fn wait_for_port(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

#[test]
fn validate_reports_every_error_with_file_line_and_field() {
    let dir = scratch("validate");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{name: http, port: 80, appProtocl: http}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/(\"}}]\n    backendRefs: [{name: missing, port: 80}]\n---\n\
         apiVersion: meshwork.dev/v1alpha1\nkind: Gadget\nmetadata: {name: g}\n",
    )
    .unwrap();
    let out = meshwork(&["validate", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("bad.yaml:5"), "unknown field located: {err}");
    assert!(err.contains("appProtocl"), "{err}");
    assert!(err.contains("Gadget"), "unknown kind named: {err}");

    let malformed = dir.join("malformed.yaml");
    std::fs::write(&malformed, "kind: Service\nmetadata: {name: [\n").unwrap();
    let out = meshwork(&["validate", "-f", malformed.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("malformed.yaml:"), "{err}");
}

#[test]
fn examples_are_valid() {
    let dir = repo_root().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = meshwork(&["validate", "-f", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n > 0, "no examples in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let b = Backend::http("slow").await;
    let dir = scratch("drain");
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, mesh_yaml(&[("slow", b.addr)])).unwrap();
    let out_port = testkit::free_port();
    let admin_port = testkit::free_port();
    let child = Command::new(BIN)
        .args(["proxy", "--config", cfg.to_str().unwrap()])
        .args(["--outbound-addr", &format!("127.0.0.1:{out_port}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
        .args([
            "--inbound-addr",
            "127.0.0.1:0",
            "--access-log",
            "off",
            "--drain-timeout-secs",
            "10",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut guard = Guard(child);
    let out: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
    wait_for_port(out).await;

    let mut inflight = Vec::new();
    for _ in 0..8 {
        let mut c = H1Client::connect(out).await.unwrap();
        inflight.push(tokio::spawn(
            async move { c.get("slow", "/delay/700").await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    for r in inflight {
        let r = r.await.unwrap().expect("in-flight request completed");
        assert_eq!(r.status, 200);
    }
    // It exits on its own, well before the drain deadline, with success.
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = guard.0.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = exited.expect("proxy exited after draining");
    assert!(status.success(), "{status:?}");
    assert!(
        tokio::net::TcpStream::connect(out).await.is_err(),
        "no longer accepting"
    );
}

fn envoy() -> PathBuf {
    PathBuf::from(std::env::var("MESHWORK_ENVOY").expect(
        "MESHWORK_ENVOY is not set: run ./scripts/test.sh, which installs Envoy and sets it",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_translation_and_routes_the_same() {
    let envoy = envoy();
    let v1 = Backend::http("v1").await;
    let v2 = Backend::http("v2").await;
    let dir = scratch("envoy");
    let cfg = dir.join("mesh.yaml");
    let yaml = mesh_yaml(&[("reviews", v1.addr), ("reviews-v2", v2.addr)])
        + r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-route, value: api}]}
    backendRefs: [{name: reviews, port: 80}]
  - backendRefs: [{name: reviews, port: 80}]
"#;
    std::fs::write(&cfg, &yaml).unwrap();
    let envoy_port = testkit::free_port();
    let envoy_admin = testkit::free_port();
    let bootstrap = dir.join("bootstrap.pb");
    let out = meshwork(&[
        "translate",
        "-f",
        cfg.to_str().unwrap(),
        "--outbound-addr",
        &format!("127.0.0.1:{envoy_port}"),
        "--envoy-bootstrap",
        bootstrap.to_str().unwrap(),
        "--envoy-admin-port",
        &envoy_admin.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let check = Command::new(&envoy)
        .args([
            "--mode",
            "validate",
            "-c",
            bootstrap.to_str().unwrap(),
            "--disable-hot-restart",
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "envoy --mode validate refused the translation:\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let child = Command::new(&envoy)
        .args([
            "-c",
            bootstrap.to_str().unwrap(),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Guard(child);
    let addr: SocketAddr = format!("127.0.0.1:{envoy_port}").parse().unwrap();
    wait_for_port(addr).await;

    let mut c = H1Client::connect(addr).await.unwrap();
    let r = c.get("reviews", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), Some("v1"));

    let req = http::Request::builder()
        .uri("/")
        .header("host", "reviews.default:80")
        .header("end-user", "jason")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(
        r.backend(),
        Some("v2"),
        "header match routes to v2 in Envoy too"
    );

    let r = c.get("reviews", "/api/items").await.unwrap();
    assert_eq!(r.backend(), Some("v1"));
    assert_eq!(
        r.json()["path"],
        "/v1/items",
        "prefix rewrite as in meshwork"
    );
    assert_eq!(r.header("x-route"), Some("api"));

    let r = c.get("nope", "/").await.unwrap();
    assert_eq!(r.status, 404, "unknown host: no route, as in meshwork");
}

/// `meshwork control` + two `meshwork proxy --control` sidecars: the client's
/// sidecar routes to the registered workload through its sidecar; a route
/// change applied through the API reaches live traffic with no failed
/// request; the proxies keep serving while the control plane is down and
/// pick up changes again once it is back (same data dir).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_feeds_proxies_and_survives_a_restart() {
    let app = Backend::http("web-app").await;
    let dir = scratch("control");
    let xds_port = testkit::free_port();
    let api_port = testkit::free_port();
    let xds = format!("127.0.0.1:{xds_port}");
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let start_control = || {
        Command::new(BIN)
            .args(["control", "--data-dir", dir.join("data").to_str().unwrap()])
            .args([
                "--xds-addr",
                &xds,
                "--api-addr",
                &api.to_string(),
                "--log-level",
                "warn",
                // The sidecars and Envoy here speak plaintext xDS.
                "--plaintext-xds",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut control = Guard(start_control());
    wait_for_port(api).await;

    let token_file = &dir.join("data").join("admin.token");
    let apply = |yaml: String| async move {
        let token = std::fs::read_to_string(token_file).unwrap();
        let mut c = H1Client::connect(api).await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri("/api/v1/apply")
            .header("host", "control")
            .header("authorization", format!("Bearer {}", token.trim()))
            .header("content-type", "application/yaml")
            .body(http_body_util::Full::new(bytes::Bytes::from(yaml)))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert!(r.status.is_success(), "apply: {} {}", r.status, r.text());
    };
    let service = "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{name: http, port: 80, appProtocol: http}]\n".to_owned();
    apply(service.clone()).await;

    // The server's sidecar registers workload web-0 (its inbound address).
    let web_in = testkit::free_port();
    let _web = Guard(
        Command::new(BIN)
            .args([
                "proxy",
                "--control",
                &xds,
                "--service",
                "web",
                "--name",
                "web-0",
            ])
            .args(["--app-port", &app.port().to_string()])
            .args(["--inbound-addr", &format!("127.0.0.1:{web_in}")])
            .args([
                "--outbound-addr",
                &format!("127.0.0.1:{}", testkit::free_port()),
            ])
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--access-log",
                "off",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The client's sidecar.
    let out: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let _client = Guard(
        Command::new(BIN)
            .args([
                "proxy",
                "--control",
                &xds,
                "--outbound-addr",
                &out.to_string(),
            ])
            .args([
                "--inbound-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .args(["--access-log", "off", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(out).await;

    async fn get_until(out: SocketAddr, want: impl Fn(&testkit::Reply) -> bool, what: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Ok(mut c) = H1Client::connect(out).await {
                if let Ok(r) = c.get("web", "/").await {
                    if want(&r) {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never saw: {what}");
    }
    get_until(
        out,
        |r| r.backend() == Some("web-app"),
        "web reachable through both sidecars",
    )
    .await;

    // An Envoy sidecar fed by the same control plane reaches the same
    // registered workload (through web-0's sidecar).
    let envoy_out: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let bootstrap = dir.join("envoy.yaml");
    std::fs::write(
        &bootstrap,
        format!(
            r#"node:
  id: envoy-client.default
  cluster: client
  metadata: {{outbound_addr: "{envoy_out}"}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
"#
        ),
    )
    .unwrap();
    let _envoy = Guard(
        Command::new(envoy())
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
                "-c",
            ])
            .arg(&bootstrap)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    get_until(
        envoy_out,
        |r| r.backend() == Some("web-app"),
        "web reachable through Envoy",
    )
    .await;

    // A route change under steady traffic: no request fails.
    let route = |value: &str| {
        format!(
            "{service}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web}}\nspec:\n  parentRefs: [{{kind: Service, name: web, port: 80}}]\n  rules:\n  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {{set: [{{name: x-version, value: {value}}}]}}\n    backendRefs: [{{name: web, port: 80}}]\n"
        )
    };
    let load = tokio::spawn(async move {
        let mut c = H1Client::connect(out).await.unwrap();
        let (mut ok, mut failed) = (0, 0);
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < until {
            match c.get("web", "/").await {
                Ok(r) if r.status == 200 => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    });
    apply(route("v1")).await;
    get_until(
        out,
        |r| r.header("x-version") == Some("v1"),
        "route change v1 applied",
    )
    .await;
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(failed, 0, "no request failed while the route changed");

    // Control plane down: traffic keeps flowing on the last good config.
    let _ = control.0.kill();
    let _ = control.0.wait();
    for _ in 0..10 {
        let mut c = H1Client::connect(out).await.unwrap();
        let r = c.get("web", "/").await.unwrap();
        assert_eq!(r.header("x-version"), Some("v1"));
    }
    // Back, from the same data dir: resources are still there, proxies
    // reconnect and follow the next change.
    control = Guard(start_control());
    wait_for_port(api).await;
    apply(route("v2")).await;
    get_until(
        out,
        |r| r.header("x-version") == Some("v2"),
        "change after restart applied",
    )
    .await;
    get_until(
        envoy_out,
        |r| r.header("x-version") == Some("v2"),
        "Envoy reconnected and follows the change too",
    )
    .await;

    // A config the proxies cannot apply (a TCP service whose local port is
    // taken on this machine) is NACKed: proxy-status shows the reason, and
    // traffic keeps flowing on the last good config.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    apply(format!(
        "{}---\napiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: db}}\nspec:\n  ports: [{{name: pg, port: 5432, appProtocol: tcp, localPort: {busy_port}}}]\n",
        route("v2")
    ))
    .await;
    let mut reason = String::new();
    for _ in 0..100 {
        let out = meshwork(&["proxy-status", "--control", &api.to_string(), "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("cannot bind") {
            reason = text;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reason.contains(&busy_port.to_string()),
        "NACK reason names the port: {reason}"
    );
    let table = meshwork(&["proxy-status", "--control", &api.to_string()]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("NACKED") && table.contains("web-0.default"),
        "{table}"
    );
    let mut c = H1Client::connect(out).await.unwrap();
    let r = c.get("web", "/").await.unwrap();
    assert_eq!(
        r.header("x-version"),
        Some("v2"),
        "last good config still serves"
    );
    drop(busy);
    drop(control);
}

#[test]
fn why_explains_allow_and_deny_with_the_deciding_policy() {
    let example = repo_root().join("examples/authz.yaml");
    let example = example.to_str().unwrap();
    let out = meshwork(&[
        "why",
        "-f",
        example,
        "--to",
        "reviews:9080",
        "--from",
        "spiffe://cluster.local/ns/default/sa/productpage",
        "--path",
        "/reviews/1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("decision: ALLOW"), "{text}");
    assert!(
        text.contains("allowed by default/reviews-readers rules[0] (AuthorizationPolicy default/reviews-readers, ALLOW, "),
        "{text}"
    );
    assert!(text.contains("authz.yaml:"), "source line: {text}");

    // DENY beats ALLOW; the audit policy that would also deny is shown.
    let out = meshwork(&[
        "why",
        "-f",
        example,
        "--to",
        "reviews.default:9080",
        "--path",
        "/admin/users",
        "-H",
        "x-canary: 1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("decision: DENY"), "{text}");
    assert!(
        text.contains("denied by default/reviews-no-admin rules[0]"),
        "{text}"
    );
    assert!(
        text.contains("audit:    would be denied by default/reviews-canary-audit rules[0]"),
        "{text}"
    );
    assert!(text.contains("from:     plaintext"), "{text}");

    // TCP: identity and port only.
    let out = meshwork(&[
        "why",
        "-f",
        example,
        "--to",
        "ratings-db",
        "--from-namespace",
        "default",
        "--from-service-account",
        "ratings",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // gRPC, and default deny for a service without an ALLOW policy match.
    let out = meshwork(&[
        "why",
        "-f",
        example,
        "--to",
        "reviews:9090",
        "--from-namespace",
        "other",
        "--grpc",
        "shop.Reviews/List",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("none: ALLOW policies apply to default/reviews and none matches"),
        "{text}"
    );

    // A question that cannot be answered: exit 2 with the reason.
    let out = meshwork(&["why", "-f", example, "--to", "nothere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Service default/nothere not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
