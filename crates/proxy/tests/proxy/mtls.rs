//! Automatic mTLS between two meshwork proxies (client sidecar -> server
//! sidecar) through real sockets, with SVIDs from a test CA, and the
//! inbound port checked by an independent TLS client (`openssl s_client`).
//!
//! Topology: both proxies run standalone from the same mesh YAML (a `Mesh`
//! with `mtls`, a Service `web` whose workload announces the server proxy's
//! inbound address with the sidecar annotation). The client proxy's
//! outbound cluster then originates mTLS to that address; the server proxy
//! fronts `web-0` and terminates it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use identity::{
    generate_key_and_csr, Ca, SpiffeId, TrustDomain, WorkloadIdentity, DEFAULT_SVID_TTL,
};
use proxy::accesslog::Target;
use proxy::{Options, Proxy};
use testkit::{Backend, H1Client, H2Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{scratch, sum_metric};

const HEAD: &str = "apiVersion: meshwork.dev/v1alpha1";
const TD: &str = "mesh.test";

fn id(td: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TrustDomain::new(td).unwrap(), "default", sa).unwrap()
}

/// A leaf (chain PEM, key PEM) for `id` from `ca`.
fn leaf(ca: &Ca, id: &SpiffeId) -> (String, String) {
    let kc = generate_key_and_csr(id).unwrap();
    let svid = ca.sign_csr(&kc.csr_pem, id, DEFAULT_SVID_TTL).unwrap();
    (svid.chain_pem(), kc.key_pem)
}

fn expired_leaf(ca: &Ca, id: &SpiffeId) -> (String, String) {
    let kc = generate_key_and_csr(id).unwrap();
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86400);
    let svid = ca
        .sign_csr_at(&kc.csr_pem, id, Duration::from_secs(3600), two_days_ago)
        .unwrap();
    (svid.chain_pem(), kc.key_pem)
}

fn workload_identity(ca: &Ca, sa: &str) -> Arc<WorkloadIdentity> {
    let (chain, key) = leaf(ca, &id(TD, sa));
    WorkloadIdentity::with_cert(&chain, &key, ca.bundle()).unwrap()
}

/// The mesh: mTLS `mode`, Service `web` (service account `web`, port 80 of
/// `proto`) whose workload `web-0` is `app`, behind the sidecar at `inbound`.
fn mesh(mode: &str, proto: &str, app: SocketAddr, inbound: SocketAddr, extra: &str) -> String {
    format!(
        "{HEAD}\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{trustDomain: {TD}, mtls: {{mode: {mode}}}}}\n---\n\
{HEAD}\nkind: Service\nmetadata: {{name: web}}\nspec:\n  serviceAccount: web\n  ports: [{{name: p80, port: 80, appProtocol: {proto}{local}}}]\n---\n\
{HEAD}\nkind: Workload\nmetadata:\n  name: web-0\n  annotations: {{meshwork.dev/sidecar-inbound: \"{inbound}\"}}\nspec: {{service: web, address: \"{}\", ports: {{p80: {}}}}}\n---\n{extra}",
        app.ip(),
        app.port(),
        local = if proto == "tcp" {
            format!(", localPort: {}", testkit::free_port())
        } else {
            String::new()
        },
    )
}

/// A meshwork sidecar from a mesh file, with an identity (shared with
/// `envoy_mtls`).
pub(crate) struct Sidecar {
    pub(crate) proxy: Proxy,
    access_log: PathBuf,
    _subscriber: proxy::logging::BoxedSubscriber,
}

impl Sidecar {
    pub(crate) async fn start(
        yaml: &str,
        workload: Option<&str>,
        inbound: SocketAddr,
        identity: Option<Arc<WorkloadIdentity>>,
    ) -> Sidecar {
        let dir = scratch();
        let file = dir.join("mesh.yaml");
        std::fs::write(&file, yaml).unwrap();
        let access_log = dir.join("access.log");
        let opts = Options {
            source: proxy::app::Source::File {
                path: file,
                poll_interval: Duration::from_millis(50),
            },
            // The server sidecar's outbound listeners on another loopback
            // address, so both sidecars can bind a TCP service's local port.
            outbound_addr: if workload.is_some() {
                "127.0.0.2:0".parse().unwrap()
            } else {
                "127.0.0.1:0".parse().unwrap()
            },
            inbound_addr: inbound,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            workload: workload.map(str::to_owned),
            access_log: Target::File(access_log.clone()),
            detect_timeout: Duration::from_millis(300),
            identity,
            capture: false,
            dns: None,
        };
        let (subscriber, log) = proxy::logging::build("warn", false).unwrap();
        let proxy = Proxy::start(opts, log).await.unwrap();
        Sidecar {
            proxy,
            access_log,
            _subscriber: subscriber,
        }
    }

    fn outbound(&self) -> SocketAddr {
        self.proxy.listener("outbound_http").unwrap()
    }

    pub(crate) async fn metrics(&self) -> String {
        let mut c = H1Client::connect(self.proxy.admin_addr()).await.unwrap();
        c.get("localhost", "/metrics").await.unwrap().text()
    }

    async fn access_log(&self) -> Vec<serde_json::Value> {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
            if !text.is_empty() {
                tokio::time::sleep(Duration::from_millis(1100)).await;
                let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
        }
        Vec::new()
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A client sidecar (identity `client_sa`) and a server sidecar (identity
/// `server_sa`) fronting `app`, both from the same mesh.
async fn pair(
    ca: &Ca,
    mode: &str,
    proto: &str,
    app: SocketAddr,
    extra: &str,
    client_sa: &str,
    server_sa: &str,
) -> (Sidecar, Sidecar, SocketAddr) {
    let inbound = local(testkit::free_port());
    let yaml = mesh(mode, proto, app, inbound, extra);
    let server = Sidecar::start(
        &yaml,
        Some("web-0"),
        inbound,
        Some(workload_identity(ca, server_sa)),
    )
    .await;
    let client = Sidecar::start(
        &yaml,
        None,
        local(0),
        Some(workload_identity(ca, client_sa)),
    )
    .await;
    (client, server, inbound)
}

#[tokio::test]
async fn http1_through_two_sidecars_is_mtls_and_the_server_sees_the_client_identity() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let (client, server, inbound) =
        pair(&ca, "strict", "http", app.addr, "", "client", "web").await;

    let mut c = H1Client::connect(client.outbound()).await.unwrap();
    for _ in 0..3 {
        let r = c.get("web", "/hello").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend(), Some("web-app"));
    }

    // The inbound port speaks mTLS only: a plaintext request is refused.
    let mut plain = TcpStream::connect(inbound).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "strict mode answered plaintext: {buf:?}");

    let m = server.metrics().await;
    let principal = id(TD, "client").to_string();
    assert_eq!(
        sum_metric(
            &m,
            "meshwork_requests_total",
            &[("direction", "inbound"), ("source_principal", &principal)]
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        sum_metric(
            &m,
            "meshwork_tls_handshake_failures_total",
            &[("reason", "plaintext_refused")]
        ),
        1.0,
        "{m}"
    );
    let log = server.access_log().await;
    let inbound_entries: Vec<_> = log
        .iter()
        .filter(|e| e["direction"] == "inbound" && e["path"] == "/hello")
        .collect();
    assert!(!inbound_entries.is_empty(), "{log:?}");
    assert_eq!(
        inbound_entries[0]["downstream_peer_principal"],
        principal.as_str()
    );
    let out = client.access_log().await;
    assert_eq!(
        out.iter()
            .find(|e| e["path"] == "/hello")
            .map(|e| e["upstream_peer_principal"].clone()),
        Some(serde_json::Value::String(id(TD, "web").to_string())),
        "{out:?}"
    );
}

#[tokio::test]
async fn http2_and_tcp_through_two_sidecars_over_mtls() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    // HTTP/2 (gRPC uses the same path: h2 inside the tunnel, ALPN h2).
    let app = Backend::http("web-h2").await;
    let (client, server, _) = pair(&ca, "strict", "http2", app.addr, "", "client", "web").await;
    let mut c = H2Client::connect(client.outbound()).await.unwrap();
    for _ in 0..3 {
        let r = c.send(testkit::get("web", "http://web/h2")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["version"], "HTTP/2.0", "{}", r.text());
    }
    let m = server.metrics().await;
    assert_eq!(
        sum_metric(
            &m,
            "meshwork_requests_total",
            &[("source_principal", &id(TD, "client").to_string())]
        ),
        3.0,
        "{m}"
    );

    // Opaque TCP: ALPN meshwork-tcp/1, bytes forwarded both ways.
    let echo = Backend::tcp_echo("echo").await;
    let (client, server, _) = pair(&ca, "strict", "tcp", echo.addr, "", "client", "web").await;
    let tcp_listener = client
        .proxy
        .listeners()
        .into_iter()
        .find(|(n, _)| n.starts_with("outbound_tcp|"))
        .map(|(_, a)| a)
        .unwrap();
    let mut s = TcpStream::connect(tcp_listener).await.unwrap();
    s.write_all(b"ping over mtls").await.unwrap();
    let mut buf = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping over mtls");
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = server.metrics().await;
    assert_eq!(
        sum_metric(
            &m,
            "meshwork_tcp_connections_opened_total",
            &[
                ("direction", "inbound"),
                ("source_principal", &id(TD, "client").to_string())
            ]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn authorization_by_principal_allows_the_client_and_denies_another_identity() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let policy = format!(
        "{HEAD}\nkind: AuthorizationPolicy\nmetadata: {{name: only-client}}\nspec:\n  targetRef: {{kind: Service, name: web}}\n  action: ALLOW\n  rules:\n  - from: [{{principals: [\"spiffe://{TD}/ns/default/sa/client\"]}}]\n---\n"
    );
    let (client, server, inbound) =
        pair(&ca, "strict", "http", app.addr, &policy, "client", "web").await;
    let r = H1Client::connect(client.outbound())
        .await
        .unwrap()
        .get("web", "/x")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // Another identity of the same mesh: authenticated, but not allowed.
    let yaml = mesh("strict", "http", app.addr, inbound, &policy);
    let intruder = Sidecar::start(
        &yaml,
        None,
        local(0),
        Some(workload_identity(&ca, "intruder")),
    )
    .await;
    let r = H1Client::connect(intruder.outbound())
        .await
        .unwrap()
        .get("web", "/x")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("x-meshwork-error"), Some("rbac_denied"));
    let m = server.metrics().await;
    assert_eq!(
        sum_metric(
            &m,
            "meshwork_authz_decisions_total",
            &[("decision", "deny")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused_and_counted() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    // The mesh says web runs as `web`; the server sidecar presents `impostor`.
    let (client, _server, _) =
        pair(&ca, "strict", "http", app.addr, "", "client", "impostor").await;
    let r = H1Client::connect(client.outbound())
        .await
        .unwrap()
        .get("web", "/x")
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(app.hits(), 0);
    let m = client.metrics().await;
    assert!(
        sum_metric(
            &m,
            "meshwork_tls_handshake_failures_total",
            &[("direction", "outbound"), ("reason", "identity_mismatch")]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_proxy_without_identity_refuses_an_mtls_config_saying_how_to_get_one() {
    let app = Backend::http("web-app").await;
    let yaml = mesh("strict", "http", app.addr, local(15999), "");
    let dir = scratch();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, yaml).unwrap();
    let opts = Options {
        source: proxy::app::Source::File {
            path: file,
            poll_interval: Duration::from_millis(50),
        },
        outbound_addr: "127.0.0.1:0".parse().unwrap(),
        inbound_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        workload: None,
        access_log: Target::Off,
        detect_timeout: Duration::from_millis(300),
        identity: None,
        capture: false,
        dns: None,
    };
    let (_s, log) = proxy::logging::build("warn", false).unwrap();
    let e = Proxy::start(opts, log).await.unwrap_err().to_string();
    assert!(e.contains("--token") && e.contains("--cert"), "{e}");
    assert!(e.contains("transport_socket_matches"), "{e}");
}

// ---------- openssl s_client against the inbound port ----------

static FILES: AtomicUsize = AtomicUsize::new(0);

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(format!("{}-{name}", FILES.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&p, contents).unwrap();
    p
}

/// Runs `openssl s_client` (TLS 1.3) against `addr`, optionally with a
/// client certificate; sends `GET /` and returns (handshake ok, output).
async fn s_client(addr: SocketAddr, cafile: &Path, cert: Option<(&Path, &Path)>) -> (bool, String) {
    // Off the runtime thread: the proxies under test run on it.
    let cafile = cafile.to_path_buf();
    let cert = cert.map(|(c, k)| (c.to_path_buf(), k.to_path_buf()));
    tokio::task::spawn_blocking(move || {
        s_client_blocking(
            addr,
            &cafile,
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
    })
    .await
    .unwrap()
}

fn s_client_blocking(
    addr: SocketAddr,
    cafile: &Path,
    cert: Option<(&Path, &Path)>,
) -> (bool, String) {
    // Bounded: s_client waits for the server to close.
    let mut cmd = Command::new("timeout");
    cmd.args([
        "10",
        "openssl",
        "s_client",
        "-tls1_3",
        "-connect",
        &addr.to_string(),
    ])
    .arg("-CAfile")
    .arg(cafile)
    .args(["-alpn", "http/1.1", "-ign_eof"]);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("openssl is installed");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET /ssl HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n");
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // With TLS 1.3 the client certificate is checked after s_client's own
    // handshake completes: success means the server answered HTTP.
    let ok = text.contains("HTTP/1.1 200");
    (ok, text)
}

#[tokio::test]
async fn openssl_strict_refuses_missing_foreign_and_expired_certificates_and_accepts_an_svid() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let inbound = local(testkit::free_port());
    let yaml = mesh("strict", "http", app.addr, inbound, "");
    let server = Sidecar::start(
        &yaml,
        Some("web-0"),
        inbound,
        Some(workload_identity(&ca, "web")),
    )
    .await;
    let dir = scratch();
    let cafile = write(&dir, "ca.pem", &ca.cert_pem());

    let (good_chain, good_key) = leaf(&ca, &id(TD, "client"));
    let (gc, gk) = (
        write(&dir, "good.pem", &good_chain),
        write(&dir, "good.key", &good_key),
    );
    let (ok, out) = s_client(inbound, &cafile, Some((&gc, &gk))).await;
    assert!(ok, "a valid SVID must be accepted:\n{out}");
    assert!(out.contains("Verify return code: 0"), "{out}");

    let (ok, out) = s_client(inbound, &cafile, None).await;
    assert!(!ok, "no client certificate must be refused:\n{out}");

    let other = Ca::generate(TrustDomain::new("other.test").unwrap()).unwrap();
    let (fc, fk) = leaf(&other, &id("other.test", "client"));
    let (fc, fk) = (write(&dir, "f.pem", &fc), write(&dir, "f.key", &fk));
    let (ok, out) = s_client(inbound, &cafile, Some((&fc, &fk))).await;
    assert!(!ok, "another trust domain must be refused:\n{out}");

    let (ec, ek) = expired_leaf(&ca, &id(TD, "client"));
    let (ec, ek) = (write(&dir, "e.pem", &ec), write(&dir, "e.key", &ek));
    let (ok, out) = s_client(inbound, &cafile, Some((&ec, &ek))).await;
    assert!(!ok, "an expired certificate must be refused:\n{out}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = server.metrics().await;
    for reason in [
        "no_client_certificate",
        "unknown_issuer",
        "certificate_expired",
    ] {
        assert_eq!(
            sum_metric(
                &m,
                "meshwork_tls_handshake_failures_total",
                &[("direction", "inbound"), ("reason", reason)]
            ),
            1.0,
            "{reason}: {m}"
        );
    }
}

#[tokio::test]
async fn permissive_accepts_plaintext_and_mtls() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let inbound = local(testkit::free_port());
    let yaml = mesh("permissive", "http", app.addr, inbound, "");
    let _server = Sidecar::start(
        &yaml,
        Some("web-0"),
        inbound,
        Some(workload_identity(&ca, "web")),
    )
    .await;
    let r = H1Client::connect(inbound)
        .await
        .unwrap()
        .get("web", "/plain")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let dir = scratch();
    let cafile = write(&dir, "ca.pem", &ca.cert_pem());
    let (chain, key) = leaf(&ca, &id(TD, "client"));
    let (c, k) = (write(&dir, "c.pem", &chain), write(&dir, "c.key", &key));
    let (ok, out) = s_client(inbound, &cafile, Some((&c, &k))).await;
    assert!(ok, "{out}");
    let (ok, out) = s_client(inbound, &cafile, None).await;
    assert!(
        !ok,
        "permissive still requires a certificate on TLS:\n{out}"
    );
}

#[tokio::test]
async fn truncated_and_garbage_handshakes_do_not_crash_or_block_others() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let (client, server, inbound) =
        pair(&ca, "strict", "http", app.addr, "", "client", "web").await;
    // A stalled half-handshake, held open.
    let mut stalled = TcpStream::connect(inbound).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x00]).await.unwrap();
    // Garbage after the record header, then close.
    let mut garbage = TcpStream::connect(inbound).await.unwrap();
    garbage
        .write_all(&[
            0x16, 0x03, 0x03, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
            11, 12,
        ])
        .await
        .unwrap();
    // Truncated: a header announcing more than is sent, then EOF.
    let mut truncated = TcpStream::connect(inbound).await.unwrap();
    truncated
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    truncated.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut sink)).await;

    // Meanwhile real traffic flows.
    let r = H1Client::connect(client.outbound())
        .await
        .unwrap()
        .get("web", "/still-fine")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = server.metrics().await;
    assert!(
        sum_metric(
            &m,
            "meshwork_tls_handshake_failures_total",
            &[("direction", "inbound")]
        ) >= 2.0,
        "{m}"
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_request() {
    let ca = Ca::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let app = Backend::http("web-app").await;
    let inbound = local(testkit::free_port());
    let yaml = mesh("strict", "http", app.addr, inbound, "");
    let server_id = workload_identity(&ca, "web");
    let client_id = workload_identity(&ca, "client");
    let _server = Sidecar::start(&yaml, Some("web-0"), inbound, Some(server_id.clone())).await;
    let client = Sidecar::start(&yaml, None, local(0), Some(client_id.clone())).await;
    let outbound = client.outbound();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while !stop.load(Ordering::SeqCst) {
                // New connections too, so rotated certificates are used.
                let mut c = H1Client::connect(outbound).await.unwrap();
                for _ in 0..5 {
                    match c.get("web", "/load").await {
                        Ok(r) if r.status == 200 => ok += 1,
                        _ => failed += 1,
                    }
                }
            }
            (ok, failed)
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (c, k) = leaf(&ca, &id(TD, "web"));
        server_id.update(&c, &k).unwrap();
        let (c, k) = leaf(&ca, &id(TD, "client"));
        client_id.update(&c, &k).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, 0);
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed += f;
    }
    assert!(ok > 50, "too little load: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
}
